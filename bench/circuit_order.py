"""When the circuit forms against when validation generalizes: Nanda et al.'s progress measures
on bare trials of a study's base, one row per (fraction, seed).

Not a speed benchmark: the figures behind docs/reproductions.md's "On the MLP, the order
differs". Each trial trains to its budget (no early stop) with the measures at every
evaluation; split and init seeds are equal, as a paper study's `vary_split` makes them.

    .venv/bin/python bench/circuit_order.py [--study studies/quickstart.yaml]
        [--fractions 0.45,0.6,0.8] [--seeds 0,1]

Columns: the phase and its timings (`phases.classify_records` with the study's rule),
t_circuit (`phases.circuit_time`), the excluded loss at the first measured evaluation after
t_train, its peak after that (and where), and at the end; the key frequencies and the
restricted loss at the end. The closing line counts the trials that generalized whose
circuit came first.
"""

from __future__ import annotations

import argparse

from grokstudy import phases, train
from grokstudy.config import with_overrides
from grokstudy.study import load_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="studies/quickstart.yaml")
    parser.add_argument("--fractions", default="0.45,0.6,0.8", help="comma-separated data.fraction values")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (split and init)")
    args = parser.parse_args()
    study = load_study(args.study)
    train.configure_process()
    first, generalized = 0, 0
    print(
        "fraction seed phase         t_train t_circuit t_val t_val_loss  excluded: fit  peak(step)    end  keys restricted"
    )
    for fraction in (float(v) for v in args.fractions.split(",")):
        for seed in (int(v) for v in args.seeds.split(",")):
            point = {"data.fraction": fraction, "train.seed": seed, "data.split_seed": seed}
            cfg = with_overrides(study.base, point | {"train.device": "cpu", "train.measures_every": 1})
            records = list(train.run(cfg))
            v = phases.classify_records(records, study.phases, cfg.train.max_steps)
            measured = [r for r in records if r.excluded_loss == r.excluded_loss]  # not NaN
            after = [r for r in measured if r.step >= (v.t_train or 0)]
            peak, end = max(after, key=lambda r: r.excluded_loss), measured[-1]
            if v.t_val is not None:
                generalized += 1
                first += v.t_circuit is not None and v.t_circuit < v.t_val
            print(
                f"{fraction:8g} {seed:4d} {v.phase:13} {v.t_train!s:>7} {v.t_circuit!s:>9} {v.t_val!s:>5} "
                f"{v.t_val_loss!s:>10} {after[0].excluded_loss:14.3g} {peak.excluded_loss:6.3g}({peak.step:5d}) "
                f"{end.excluded_loss:6.3g} {end.key_frequencies:5.0f} {end.restricted_loss:10.2g}",
                flush=True,
            )
    print(
        f"{study.name}: the circuit (t_circuit) came before t_val in {first} of {generalized} trials that generalized"
    )


if __name__ == "__main__":
    main()
