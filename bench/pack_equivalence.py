"""How close each pack-vs-lone case of tests/test_packed.py comes to its tolerance on this CPU.

A pack reproduces its members' lone runs up to round-off, and training amplifies round-off; how
much depends on the regime and on the CPU's kernels (AVX2 and AVX-512 sum in other orders). For
every case of `test_packed.CURVES` this trains the pack and each member alone and prints the worst
|packed - alone| / (atol + rtol |alone|) over every metric and eval step (1.0 = the test fails).
The closing line is the worst ratio over all cases. A minute on one core:

    .venv/bin/python bench/pack_equivalence.py
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the cases are test code
from test_packed import ATOL, CURVES, METRICS, RTOL, members, run_all  # noqa: E402

from grokstudy import packed, train  # noqa: E402


def margin(base) -> float:
    """Worst deviation of any member's packed curve from its lone run, in tolerances."""
    cfgs = members(base)
    got = run_all(packed.init_pack(cfgs))
    worst = 0.0
    for i, cfg in enumerate(cfgs):
        for alone, pack in zip(train.run(cfg), got[i], strict=True):
            for key in METRICS:
                x, y = getattr(alone, key), getattr(pack, key)
                if not math.isnan(x):
                    worst = max(worst, abs(x - y) / (ATOL + RTOL * abs(x)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CURVES), help="only these cases")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the test runs them
    ratios = {}
    for name in args.case or CURVES:
        ratios[name] = margin(CURVES[name])
        print(f"{name:45s} worst deviation / tolerance {ratios[name]:.2e}", flush=True)
    name = max(ratios, key=ratios.get)
    print(f"worst deviation / tolerance over {len(ratios)} cases: {ratios[name]:.2e} ({name})")


if __name__ == "__main__":
    main()
