"""The `grokstudy` command: parse, validate, call one library function, print, exit.

The only module that prints for humans or chooses an exit code: 0 success,
1 a study finished with failed trials (named; `--retry-failed` runs them again),
2 bad input or a place that cannot be used (one line per problem, naming its
dotted path or flag; never a traceback; nothing written), 3 the study crashed or
was stopped (SIGTERM from `ray job stop`, MLflow down too long: one line; a
crash's traceback goes to `<out>/crash.log`), 4 another driver took the study's
storage lease (this one stopped and wrote nothing more), 5 the study finished
but MLflow did not store all of it, 130 interrupted (Ctrl-C). A study stopped
by 3 or 130 resumes, and one that ended with 5 is settled, when the same command
runs again. Passwords in URIs are never printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from grokstudy import __version__
from grokstudy.config import PHASE_RULES
from grokstudy.errors import StudyError, UsageError, one_line
from grokstudy.uris import redact

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CRASHED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_LEASE_LOST, EXIT_TRACKING_INCOMPLETE = 4, 5


RUN_EPILOG = """examples:
  grokstudy run studies/quickstart.yaml
  grokstudy run studies/smoke.yaml --set train.max_steps=200 --out /tmp/smoke
  grokstudy run studies/wd_vs_frac_transformer.yaml --address 10.0.0.5:6379 --tracking-uri http://mlflow:5000
  ray job submit --working-dir . -- grokstudy run studies/quickstart.yaml --out /shared/runs/quickstart
Re-running the same command resumes the study: finished trials are kept. A study may grow
between runs (more search.seeds, more values on a grid axis, a larger search.budget or
num_samples): only the new trials run. Any other change is refused; --fresh starts over,
keeping the old results beside the new ones (<out>.archived-<time>)."""

TRAIN_EPILOG = """examples:
  grokstudy train
  grokstudy train --set task.p=47 --set optimizer.weight_decay=0 --json
  grokstudy train --study studies/quickstart.yaml --set data.fraction=0.3"""

STATUS_EPILOG = """examples:
  grokstudy status runs/quickstart --watch
  grokstudy status s3://bucket/grokstudy/quickstart      # a cluster study's run.storage/<name>
  grokstudy status --experiment quickstart --tracking-uri http://mlflow:5000
grid: one letter per cell of the study's diagram (legend below it); ~ while a trial there runs."""

PLOT_EPILOG = """examples:
  grokstudy plot runs/quickstart
  grokstudy plot runs/quickstart/trials.parquet --x optimizer.weight_decay --y data.fraction --format png,svg
  grokstudy plot quickstart --tracking-uri sqlite:///$PWD/runs/quickstart/mlflow.db
  grokstudy plot runs/quickstart --where 'phase == "grokking" and `data.fraction` < 0.5'
  grokstudy plot runs/quickstart --trials 3f9c2a1b7e-s0,3f9c2a1b7e-s1 --format pdf   # ids: trials.parquet
  grokstudy plot runs/wd_adamw runs/wd_adam --out figures/compare   # two studies side by side
  grokstudy plot runs/quickstart --rule liu2022   # read by Liu et al.'s rule: figures/rule-liu2022/"""

REPORT_EPILOG = """examples:
  grokstudy report runs/quickstart
  grokstudy report runs/quickstart --out /tmp/quickstart.html --tracking-uri http://mlflow:5000
One file, no server: open it in any browser, offline. Hover a cell for its trials; click it for their curves."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _fail(f"{self.prog}: error: {message}")


def _fail(message: str) -> None:
    for line in redact(message).splitlines():
        print(line, file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _directory(text: str) -> Path:
    """An --out value: never empty (Path("") would silently mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give a directory")
    return Path(text)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port, 1 to 65535 (got {text!r})")
    return port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds, 0.1 to 3600 (got {text!r})")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="grokstudy",
        description="Distributed phase-diagram studies of grokking (Ray Tune + Optuna + MLflow).",
        epilog="Run `grokstudy COMMAND --help` for each command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"grokstudy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("run", help="run (or resume) a study on Ray", epilog=RUN_EPILOG, formatter_class=fmt)
    p.add_argument("study", type=Path, help="study file, e.g. studies/quickstart.yaml")
    _add_set(p)
    p.add_argument("--out", type=_directory, help="output directory (default: run.out or runs/<name>)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite in --out)"
    )
    p.add_argument("--format", default="png,pdf", help="figure formats, comma-separated (png, svg, pdf)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray (default: all)")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="run again, from the start, the trials a finished study recorded as FAILED (beyond run.max_failures)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start the study over: its earlier results (output, Tune experiment, MLflow parent run) are "
        "archived beside it, not resumed",
    )

    p = sub.add_parser(
        "train", help="train one trial locally (no Ray, no MLflow)", epilog=TRAIN_EPILOG, formatter_class=fmt
    )
    p.add_argument("--study", type=Path, help="take the base trial from this study file")
    _add_set(p)
    p.add_argument("--json", action="store_true", help="end with one JSON line of the result")

    p = sub.add_parser("validate", help="check a study file and print the resolved study")
    p.add_argument("study", type=Path)
    p.add_argument(
        "--resolved",
        action="store_true",
        help="print the whole study as YAML, extends: merged and defaults filled in",
    )
    _add_set(p)

    p = sub.add_parser(
        "plot", help="export phase diagrams and learning curves", epilog=PLOT_EPILOG, formatter_class=fmt
    )
    p.add_argument(
        "source", nargs="+",
        help="study output dir, trials.parquet, or MLflow experiment name/id; two: their phase diagrams side by side",
    )  # fmt: skip
    p.add_argument("--x", help="x axis (default: the study's diagram.x)")
    p.add_argument("--y", help="y axis (default: the study's diagram.y)")
    p.add_argument("--facet", help="a third column: one panel per value")
    p.add_argument("--trials", metavar="ID,ID", help="draw only the learning curves of these trials")
    p.add_argument(
        "--where", metavar="EXPR",
        help="draw only the learning curves of the trials where this pandas query over trials.parquet holds, "
        "e.g. 'phase == \"grokking\"'; dotted columns go in backticks: '`optimizer.weight_decay` > 0.1'",
    )  # fmt: skip
    p.add_argument("--format", default="png,pdf", help="comma-separated: png, svg, pdf")
    p.add_argument("--out", type=_directory, help="where to write figures (default: <first source>/figures)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI when SOURCE is an experiment")
    p.add_argument(
        "--rule", metavar="NAME",
        help=f"redraw under this phase rule ({', '.join(PHASE_RULES)}): every trial read again from its "
        "curve, into <out>/rule-NAME/ (the study's own figures stay); prints the cells that changed",
    )  # fmt: skip

    p = sub.add_parser(
        "export", help="bring a study home from MLflow or its Ray Tune experiment: tables, figures, report, "
        "study file, weights", formatter_class=fmt,
        epilog="examples:\n"
        "  grokstudy export --experiment quickstart --tracking-uri http://mlflow:5000 --out runs/quickstart\n"
        "  grokstudy export s3://bucket/grokstudy/ray/quickstart --out runs/quickstart   # run.storage/<name>\n"
        "  grokstudy export runs/quickstart/ray/quickstart --out /tmp/quickstart --no-weights\n"
        "The same study exported again into the same --out refreshes it.",
    )  # fmt: skip
    p.add_argument(
        "source", nargs="?",
        help="a Ray Tune experiment: directory or URI (s3://, gs://, file://; run.storage/<name>), or an "
        "MLflow experiment name/id",
    )  # fmt: skip
    p.add_argument("--experiment", help="read the study from this MLflow experiment (name or id) instead")
    p.add_argument(
        "--out", type=_directory, required=True,
        help="the study's new home, read by grokstudy.load, plot, report and status (e.g. runs/<name>)",
    )  # fmt: skip
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument(
        "--no-weights", action="store_true",
        help="leave the trials' final weights where they are (weights_uri keeps naming them there)",
    )  # fmt: skip
    p.add_argument("--format", default="png,pdf", help="figure formats, comma-separated (png, svg, pdf)")

    p = sub.add_parser(
        "status", help="where a study stands, while it runs or after (read-only)", epilog=STATUS_EPILOG,
        formatter_class=fmt,
    )  # fmt: skip
    p.add_argument("source", nargs="?", help="study output dir, or a Ray Tune experiment dir or URI")
    p.add_argument("--experiment", help="read the study from this MLflow experiment instead")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI for --experiment (default: MLFLOW_TRACKING_URI)"
    )
    p.add_argument(
        "--watch", type=_seconds, nargs="?", const=2.0, metavar="SECONDS",
        help="redraw every SECONDS (default 2) until Ctrl-C or the study ends",
    )  # fmt: skip

    p = sub.add_parser("ui", help="open the MLflow UI on a study's local tracking store")
    p.add_argument("study_dir", type=Path, help="a study output directory, e.g. runs/quickstart")
    p.add_argument("--port", type=_port, default=5000)

    p = sub.add_parser(
        "report", help="write one self-contained HTML page of a study's results", epilog=REPORT_EPILOG,
        formatter_class=fmt,
    )  # fmt: skip
    p.add_argument("dir", type=Path, metavar="DIR", help="a study output directory (holds trials.parquet)")
    p.add_argument("--out", type=Path, metavar="FILE", help="the page to write (default: DIR/report.html)")
    p.add_argument(
        "--tracking-uri",
        help="MLflow server whose run pages to link, http(s) (default: MLFLOW_TRACKING_URI, else the "
        "study's run.tracking_uri)",
    )
    return parser


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted key, e.g. --set optimizer.weight_decay=0.1 (repeatable)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handler = {
        "run": _cmd_run,
        "train": _cmd_train,
        "validate": _cmd_validate,
        "plot": _cmd_plot,
        "export": _cmd_export,
        "ui": _cmd_ui,
        "status": _cmd_status,
        "report": _cmd_report,
    }[args.command]
    try:
        return handler(args)
    except (StudyError, UsageError) as e:
        _fail("\n".join(f"grokstudy {args.command}: error: {line}" for line in str(e).splitlines()))
    except OSError as e:  # a file or directory that cannot be read or written (run has its own)
        _fail(f"grokstudy {args.command}: error: {one_line(e)}")
    return EXIT_USAGE  # unreachable; keeps type checkers calm


# ---- subcommands ------------------------------------------------------------------------


def _formats(text: str) -> tuple[str, ...]:
    from grokstudy.figures import parse_formats

    return parse_formats(text)


def _cmd_validate(args: argparse.Namespace) -> int:
    from grokstudy.study import describe, load_study, study_to_dict

    study = load_study(args.study, args.overrides)
    if args.resolved:
        import yaml

        print(yaml.safe_dump(study_to_dict(study), sort_keys=False), end="")
    else:
        print(describe(study))
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from grokstudy.storage import LeaseLost, check_dir
    from grokstudy.study import load_study

    study = load_study(args.study, args.overrides)
    formats = _formats(args.format)
    out_dir = check_dir(args.out or Path(study.run.out or Path("runs") / study.name), "--out").resolve()
    from grokstudy.api import prepare_embedded_ray

    prepare_embedded_ray(args.address)  # before the runner imports ray
    from grokstudy import console, runner
    from grokstudy.progress import TrackingUnavailable

    n = study.search.n_trials
    count = f"{study.search.n_points} points x {study.search.seeds} seeds = {n} trials" if n else "adaptive"
    pack = runner.pack_size(study)
    packs = "pack size measured" if pack == "auto" else f"packs of up to {pack}"
    print(
        f"grokstudy: study {study.name!r}: {count} ({study.search.sampler}, {packs}); output in "
        f"{out_dir} (Ray, MLflow and Tune log to {console.DRIVER_LOG})",
        flush=True,
    )
    view = console.ProgressView(sys.stdout)
    try:
        try:
            outcome = runner.run_study(
                study,
                out_dir=out_dir,
                address=args.address,
                tracking_uri=args.tracking_uri,
                formats=formats,
                progress=view,
                num_cpus=args.num_cpus,
                # `ray job stop` sends SIGTERM: stop as Ctrl-C does (Tune saves the experiment), then
                # end the parent run FAILED and exit 3.
                stop_on_sigterm=True,
                retry_failed=args.retry_failed,
                quiet_libraries=True,
                fresh=args.fresh,
            )
        finally:
            view.close()
    except (StudyError, UsageError):
        raise
    except LeaseLost as e:
        print(f"grokstudy run: stopped: {e}; nothing more was written", file=sys.stderr)
        return EXIT_LEASE_LOST
    except (KeyboardInterrupt, runner.Interrupted) as e:
        stopped = runner.stop_reason()
        why = f"stopped by {stopped}" if stopped else f"interrupted: {e or 'Ctrl-C'}"
        print(f"grokstudy run: {why}; run the same command again to resume", file=sys.stderr)
        return EXIT_CRASHED if stopped else EXIT_INTERRUPTED
    except TrackingUnavailable as e:
        print(f"grokstudy run: stopped: {e}", file=sys.stderr)
        return EXIT_CRASHED
    except Exception as e:
        where = _crash_log(out_dir)
        print(
            redact(f"grokstudy run: crashed: {one_line(e)}; traceback {where}; run the same command again "
                   "to resume"),
            file=sys.stderr,
        )  # fmt: skip
        return EXIT_CRASHED
    _print_summary(outcome)
    if outcome.tracking_incomplete:
        print(
            redact(f"grokstudy run: MLflow is incomplete: {'; '.join(outcome.tracking_incomplete)}; run "
                   "the same command again to settle it (the tables and figures are whole)"),
            file=sys.stderr,
        )  # fmt: skip
        return EXIT_TRACKING_INCOMPLETE
    return EXIT_FAILED if outcome.failed else EXIT_OK


def _crash_log(out_dir: Path) -> str:
    """Write the current traceback to `<out>/crash.log` (atomically: a planted symlink is
    replaced, never followed) and say where it went; never raises."""
    import traceback

    from grokstudy.storage import write_atomic

    text = redact(traceback.format_exc())
    try:
        write_atomic(out_dir / "crash.log", text)
        return f"in {out_dir / 'crash.log'}"
    except Exception as err:  # the very directory may be what failed: the traceback goes to stderr
        print(text, file=sys.stderr, end="")
        return f"above (crash.log could not be written: {one_line(err, 200)})"


SUMMARY_BY_POINT_ABOVE = 50
"""A study with more trials than this prints one summary row per point, not per trial."""


def _print_summary(outcome) -> None:  # collect.StudyOutcome
    from grokstudy import results

    rows = results.read_trials(outcome.trials_path).to_pylist()
    if rows:
        rows.sort(key=_numeric_order)
        if len(rows) > SUMMARY_BY_POINT_ABOVE:
            _print_points(rows)
        else:
            _print_trials(rows)
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(outcome.phase_counts.items()))
    print(f"\nphases: {counts or 'none'}" + (" (resumed study)" if outcome.resumed else ""))
    if outcome.grown:
        print(
            f"the study grew ({'; '.join(outcome.grown)}): its finished trials were kept, only new ones ran"
        )
    if outcome.retried:
        print(f"ran again {outcome.retried} trial(s) that had failed")
    if outcome.lost:
        print(f"requeued {outcome.lost} trial(s) the interrupted driver had started but not recorded")
    if outcome.failed:
        print(
            f"FAILED trials ({len(outcome.failed)}, beyond run.max_failures retries): {', '.join(outcome.failed)}"
        )
    print(f"trials table:  {outcome.trials_path}")
    print(f"curves table:  {outcome.curves_path}")
    for path in outcome.figures:
        print(f"figure:        {path}")
    if outcome.report is not None:
        print(f"report:        {outcome.report}  (open it in a browser: hover and click the cells)")
    if outcome.weights is not None:
        files, size, where = outcome.weights
        print(f"weights:       {files} trials' final weights, {size / 1e6:.1f} MB, in {redact(where)}")
    print(f"MLflow:        {redact(outcome.tracking_uri)}  (parent run {outcome.parent_run_id})")
    if outcome.tracking_uri.startswith("sqlite:"):
        print(f"browse:        grokstudy ui {outcome.out_dir}")
    if outcome.elapsed_s is not None:
        from grokstudy.console import duration

        print(f"wall-clock:    {duration(outcome.elapsed_s)} since the study first started")


def _numeric_order(row: dict) -> tuple:
    """Rows by their searched values as numbers (0.1 < 0.3 < 1), in the study's axis order,
    then by seed; text values after numbers."""
    from grokstudy.points import SEED

    def key(v: object) -> tuple:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return (1, 0.0, str(v))
        return (0, float(v), "")

    return tuple(key(row[k]) for k in row["searched"] if k != SEED) + (key(row[SEED]),)


def _print_trials(rows: list[dict]) -> None:
    labels = {r["trial_id"]: _label(r) for r in rows}
    width = max(len(v) for v in labels.values())
    print(f"\n{'trial':<{width}}  {'phase':<13} {'t_train':>8} {'t_val':>8} {'stop':>11}")
    for r in rows:
        print(
            f"{labels[r['trial_id']]:<{width}}  {r['phase'] or '-':<13} {_steps(r['t_train']):>8} "
            f"{_steps(r['t_val']):>8} {r['stop_reason'] or '-':>11}"
        )


def _print_points(rows: list[dict]) -> None:
    """One row per point: its seeds' majority phase (k/n), median t_train and t_val over the
    seeds that reached them, failed seeds."""
    import statistics

    from grokstudy.phases import vote
    from grokstudy.points import SEED, point_label

    points: dict[str, list[dict]] = {}
    for r in rows:
        points.setdefault(r["point_id"], []).append(r)
    labels = {
        pid: point_label({k: rs[0][k] for k in rs[0]["searched"] if k != SEED}) for pid, rs in points.items()
    }
    width = max(len(v) for v in labels.values())
    print(
        f"\n{'point':<{width}}  {'phase':<18} {'t_train':>8} {'t_val':>8} {'failed':>6}   (medians over seeds)"
    )
    for pid, rs in points.items():
        phases = [r["phase"] for r in rs if r["phase"]]
        v = vote(phases)
        phase = f"{v.phase} {v.count}/{len(rs)}" if phases else "-"

        def median(col: str, rs: list[dict] = rs) -> str:
            values = [r[col] for r in rs if r[col] is not None]
            return _steps(round(statistics.median(values))) if values else "-"

        failed = sum(r["status"] == "ERROR" for r in rs)
        print(f"{labels[pid]:<{width}}  {phase:<18} {median('t_train'):>8} {median('t_val'):>8} {failed:>6}")


def _label(row: dict) -> str:
    from grokstudy.points import SEED, point_label

    return point_label({k: row[k] for k in [*(k for k in row["searched"] if k != SEED), SEED]})


def _steps(v: int | None) -> str:
    return "-" if v is None else str(v)


def _cmd_train(args: argparse.Namespace) -> int:
    from grokstudy import footprint
    from grokstudy.config import PhaseConfig
    from grokstudy.study import load_study, trial_from_overrides

    cfg = trial_from_overrides(args.overrides, args.study)
    phase_cfg = load_study(args.study).phases if args.study else PhaseConfig()
    need, have = footprint.trial_bytes(cfg), footprint.machine_bytes()
    if have and need > have:
        raise StudyError("model", f"this trial needs about {footprint.describe(need)}, more than this "
                         f"machine's {footprint.describe(have)}; use a smaller model, task or batch")  # fmt: skip
    try:
        return _train(args, cfg, phase_cfg)
    except (MemoryError, RuntimeError) as err:
        if not footprint.is_out_of_memory(err):
            raise
        print(f"grokstudy train: error: out of memory ({one_line(err, 200)}); use a smaller model, "
              "task or batch", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE


def _train(args: argparse.Namespace, cfg, phase_cfg) -> int:  # config.TrialConfig, config.PhaseConfig
    from grokstudy import phases, train

    train.configure_process()
    state = train.init_state(cfg)
    curve = []
    tty = sys.stdout.isatty()
    print(
        f"grokstudy train: {cfg.task.op} mod {cfg.task.p}, {cfg.model.kind}, "
        f"{cfg.optimizer.name} lr={cfg.optimizer.lr:g} wd={cfg.optimizer.weight_decay:g}, "
        f"fraction={cfg.data.fraction:g}, {cfg.train.max_steps} steps",
        flush=True,
    )
    for rec in train.run(cfg, state):
        curve.append(rec)
        so_far = phases.classify_records(curve, phase_cfg, cfg.train.max_steps)
        line = (
            f"step {rec.step:>7}/{cfg.train.max_steps}  train/acc {rec.train_acc:6.3f}  "
            f"val/acc {rec.val_acc:6.3f}  val/loss {rec.val_loss:9.4f}  phase so far: {so_far.phase}"
        )
        if tty:
            print("\r" + line, end="", flush=True)
        elif rec.step % (cfg.train.eval_every * 10) == 0 or rec.step == cfg.train.max_steps:
            print(line, flush=True)
        if phases.diverged(rec):
            break
    if tty:
        print()
    verdict = phases.classify_records(curve, phase_cfg, cfg.train.max_steps)
    last = curve[-1]
    print(
        f"phase: {verdict.phase}  t_train: {_steps(verdict.t_train)}  t_val: {_steps(verdict.t_val)}  "
        f"final train/acc {last.train_acc:.3f}  val/acc {last.val_acc:.3f}  ({last.elapsed_s:.1f} s training)"
    )
    if args.json:
        result = {
            "phase": verdict.phase,
            "t_train": verdict.t_train,
            "t_val": verdict.t_val,
            "delay": verdict.delay,
            "steps": last.step,
            "final_train_acc": last.train_acc,
            "final_val_acc": last.val_acc,
            "final_train_loss": last.train_loss,
            "final_val_loss": last.val_loss,
            "elapsed_s": last.elapsed_s,
        }
        # Strict JSON: a non-finite number (a diverged loss) is null, never NaN.
        finite = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in result.items()}
        print(json.dumps(finite, allow_nan=False))
    return EXIT_OK


def _cmd_plot(args: argparse.Namespace) -> int:
    from grokstudy import figures, results
    from grokstudy.storage import check_dir

    formats = _formats(args.format)
    if len(args.source) > 2:
        raise UsageError("SOURCE", f"give one study, or two to compare; got {len(args.source)}")
    trial_ids = [t.strip() for t in args.trials.split(",") if t.strip()] if args.trials is not None else None
    choosing = trial_ids is not None or args.where is not None
    comparing = len(args.source) == 2
    if comparing and (choosing or args.facet):
        flag = "--facet" if args.facet else "--trials" if trial_ids is not None else "--where"
        raise UsageError(flag, "draws one study; two SOURCEs draw their phase diagrams side by side")
    if args.rule is not None:
        from grokstudy.relabel import rule_phases

        rule_phases(args.rule)  # a bad name is refused before anything is read
    if args.out is not None:
        check_dir(args.out, "--out")
    loaded = [_load_results(source, args.tracking_uri) for source in args.source]
    cells_files = [Path(source) / results.CELLS_FILE for source in args.source]
    cells = [results.read_cells(f) if f.exists() else None for f in cells_files]
    if args.rule is not None:  # into a directory of its own: the study's figures stay as they are
        loaded, cells = _relabelled(args.rule, args.source, loaded)
    trials, curves, default_out = loaded[0]
    out = check_dir(args.out or default_out, "--out").resolve()
    if args.rule is not None:
        out = out / f"rule-{args.rule}"
    if comparing:
        names = [", ".join(sorted(set(t.column("study").to_pylist()))) for t, _, _ in loaded]
        if names[0] == names[1]:  # two runs of one study: tell them apart by where they are
            names = list(args.source)
        if args.rule is not None:
            names = [f"{name} (rule {args.rule})" for name in names]
        studies = [(name, t) for name, (t, _, _) in zip(names, loaded, strict=True)]
        fig = figures.compare_phase_diagrams(studies, args.x, args.y, cells=cells)
        paths = figures.save_figure(fig, out, "compare_phase_diagram", formats)
    elif choosing:
        if curves is None:
            raise UsageError("SOURCE", f"{args.source[0]} has no curves table to draw learning curves from")
        chosen = figures.select_trials(trials, trial_ids, args.where)
        fig = figures.learning_curves(trials, curves, trial_ids=chosen)
        paths = figures.save_figure(fig, out, "learning_curves", formats)
    else:
        paths = figures.render_study(
            trials, curves, out, x=args.x, y=args.y, facet=args.facet, formats=formats, cells=cells[0]
        )
    for path in paths:
        print(f"figure: {path}")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from grokstudy import export
    from grokstudy.storage import check_dir

    formats = _formats(args.format)
    out = check_dir(args.out, "--out").resolve()
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    source = export.read(args.source, args.experiment, uri)
    export.check_out(out, source.study.name)
    print(f"grokstudy export: study {source.study.name!r} from {source.described} into {out}", flush=True)
    done = export.export_study(source, out, copy_weights=not args.no_weights, formats=formats)
    print(f"study file:    {done.study_file}")
    print(f"trials table:  {done.tables[0]} ({done.n_trials} trials)")
    print(f"curves table:  {done.tables[1]} ({done.n_curve_rows} rows)")
    if len(done.tables) > 2:
        print(f"cells table:   {done.tables[2]}")
    if done.figures:
        names = ", ".join(dict.fromkeys(p.stem for p in done.figures))
        kinds = ", ".join(dict.fromkeys(p.suffix.lstrip(".") for p in done.figures))
        print(f"figures:       {len(done.figures)} in {done.figures[0].parent} ({names}; {kinds})")
    print(f"report:        {done.report}  (open it in a browser)")
    print(f"progress:      {done.progress}  (grokstudy status reads it)")
    (files, size), (away, about) = done.local_weights, done.remote_weights

    def trials(n: int) -> str:
        return f"{n} trial's" if n == 1 else f"{n} trials'"

    def size_of(n: int) -> str:
        return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"

    if files:
        print(f"weights:       {trials(files)} final weights, {size_of(size)}, in {out / 'weights'}")
    elif not away:
        print("weights:       none (no trial finished, or the study ran with run.save_weights: none)")
    if away:
        why = "could not be copied" if done.failed else "left at the source (--no-weights)"
        print(f"weights:       {trials(away)} final weights, about {size_of(about)}, {why}")
    if done.failed:
        print(
            redact(f"grokstudy export: warning: {trials(len(done.failed))} weights could not be copied "
                   f"(weights_uri still names the source): {'; '.join(done.failed[:3])}"),
            file=sys.stderr,
        )  # fmt: skip
    return EXIT_OK


def _relabelled(rule: str, sources: Sequence[str], loaded: list) -> tuple[list, list]:
    """(tables, cells) of each source read again by the phase rule `rule` (`relabel`), printing
    how many trials and cells changed phase, and which cells."""
    from grokstudy import relabel

    tables, cells = [], []
    for source, (trials, curves, default_out) in zip(sources, loaded, strict=True):
        done = relabel.relabel(trials, curves, rule, relabel.study_beside(source))
        print(
            f"rule {rule}: {done.changed_trials} of {done.finished_trials} trials and {len(done.changes)} "
            f"of {done.n_cells} cells changed phase ({source})"
        )
        for change in done.changes:
            print(f"  {change.describe()}")
        tables.append((done.trials, curves, default_out))
        cells.append(done.cells)
    return tables, cells


def _load_results(source: str, tracking_uri: str | None, prefer_rebuild: bool = False):
    """(trials, curves, default figure dir) from any kind of SOURCE (`api.load_tables`)."""
    from grokstudy.api import load_tables

    return load_tables(source, tracking_uri, prefer_rebuild)


def _cmd_status(args: argparse.Namespace) -> int:
    import time

    from grokstudy import status

    if args.source is None and args.experiment is None:
        raise UsageError("SOURCE", "give a study directory (or Tune experiment), or --experiment NAME")
    if args.source is not None and args.experiment is not None:
        raise UsageError("SOURCE", "give a study directory or --experiment NAME, not both")
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if args.experiment is not None and not uri:
        raise UsageError("--tracking-uri", "--experiment needs --tracking-uri (or MLFLOW_TRACKING_URI)")

    def read() -> status.StudyStatus:
        if args.experiment is not None:
            return status.read_mlflow(uri, args.experiment)
        return status.read_directory(args.source)

    current = read()
    if args.watch is None:
        print(status.render(current))
        return EXIT_OK
    tty = sys.stdout.isatty()
    try:
        while True:
            text = status.render(current)
            print(("\033[H\033[2J" if tty else "") + text + ("" if tty else "\n"), flush=True)
            if current.snapshot.driver.get("state", "running") != "running" or current.alive is False:
                return EXIT_OK
            time.sleep(args.watch)
            current = read()
    except KeyboardInterrupt:
        return EXIT_OK


def _cmd_ui(args: argparse.Namespace) -> int:
    from grokstudy import tracking

    db = args.study_dir.resolve() / "mlflow.db"
    if not db.is_file():
        raise UsageError(
            "STUDY_DIR", f"no MLflow store at {db}; run the study first or pass its output directory"
        )
    tracking.check_store(db)
    cmd = tracking.ui_command(f"sqlite:///{db}", port=args.port)
    print(f"grokstudy ui: serving {db} at http://127.0.0.1:{args.port} (Ctrl-C to stop)", flush=True)
    os.environ.update(tracking.UI_ENV)
    os.execvp(cmd[0], cmd)
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from grokstudy import report

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    path = report.write_study_report(args.dir, args.out, tracking_uri=uri)
    print(f"report: {path} ({path.stat().st_size / 1000:.0f} kB)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
