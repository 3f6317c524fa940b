"""The numbers of docs/reproductions.md: per study run by `make papers`, per searched point,
the phases of its seeds and the median steps to fit, to generalize and to a validation loss
below the study's threshold (a seed that never got there counts as infinitely late; a
median that is not finite shows as "never").

    .venv/bin/python studies/papers/summarize.py runs/papers > docs/reproductions/numbers.md
"""

from __future__ import annotations

import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq


def median(values: list[int | None]) -> str:
    finite = sorted(v if v is not None else float("inf") for v in values)
    m = statistics.median(finite) if finite else float("inf")
    return "never" if m == float("inf") else f"{m:,.0f}"


def main(root: Path) -> None:
    for study in sorted(p for p in root.iterdir() if (p / "trials.parquet").exists()):
        rows = pq.read_table(study / "trials.parquet").to_pylist()
        searched = [k for k in rows[0]["searched"] if k != "train.seed"]
        print(f"### {study.name}\n")
        print(f"| {' | '.join(searched)} | seeds | phases | t_train | t_val | t_val_loss |")
        print("|" + " --- |" * (len(searched) + 5))
        points = defaultdict(list)
        for r in rows:
            points[tuple(str(r[k]) for k in searched)].append(r)
        for point, members in sorted(points.items()):
            phases = ", ".join(f"{p} {n}" for p, n in Counter(m["phase"] for m in members).most_common())
            cells = [median([m[k] for m in members]) for k in ("t_train", "t_val", "t_val_loss")]
            print(f"| {' | '.join(point)} | {len(members)} | {phases} | {' | '.join(cells)} |")
        wall = sum(r["wall_s"] for r in rows)
        print(f"\n{len(rows)} trials, {wall / 60:.1f} min of training in all.\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/papers"))
