"""The Python front door (`grokstudy.api`) on a real study: `grokstudy.run` with overrides, the
results as data frames and figures, a trial's model from its weights (on storage and from MLflow),
and the example notebook executed top to bottom on it."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import drivers
import pytest
import torch

import grokstudy
from grokstudy import measures, runner
from grokstudy.cli import main
from grokstudy.errors import UsageError


@pytest.fixture(scope="module")
def embedded_ray() -> Iterator[None]:
    import ray

    started = runner.init_ray(None, num_cpus=2)
    yield
    if started:
        ray.shutdown()


NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "examples" / "explore.ipynb"


def run_notebook(path: Path) -> dict:
    """Execute a notebook's code cells top to bottom in one namespace, as a kernel would; a cell
    ending in an expression has it evaluated, and a figure it returns is drawn (Jupyter shows it)."""
    import ast
    import io

    from matplotlib.figure import Figure

    namespace: dict = {"__name__": "__main__"}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        tree = ast.parse("".join(cell["source"]))
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, str(path), "exec"), namespace)
        if last is not None:
            shown = eval(compile(ast.Expression(last.value), str(path), "eval"), namespace)
            if isinstance(shown, Figure):
                shown.savefig(io.BytesIO(), format="png")
            namespace["_"] = shown
    return namespace


@pytest.mark.integration
def test_the_python_api_runs_a_study_and_the_example_notebook_reads_it_top_to_bottom(
    embedded_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    study_file = drivers.write_study(tmp_path)  # 4 MLP trials of (x + y) mod 23, 1,500 steps
    # Overrides as `--set` takes them: Gromov's quadratic model with MSE, which on (x + y) mod 23
    # memorizes at 30% of the pairs and groks at 60% within 400 steps, so the notebook has a
    # model that grokked to open in seconds of training.
    res = grokstudy.run(
        study_file, tmp_path / "out", model__kind="gromov", model__width=128, optimizer__lr=0.01,
        train__loss="mse", train__max_steps=400, phases__min_delay=100,
        search__space__data__fraction={"values": [0.3, 0.6]},
        search__space__optimizer__weight_decay={"values": [1.0]},
    )  # fmt: skip
    assert "trials" in capsys.readouterr().out  # the progress bar, on stdout
    assert len(res.trials) == 2 and set(res.trials["max_steps"]) == {400}
    assert str(res.trials["phase"].dtype).endswith("[pyarrow]")  # pyarrow-backed frames
    assert set(res.curves["trial_id"]) == set(res.trials["trial_id"])
    assert res.phase_diagram().axes and res.learning_curves().axes
    ids = res.select(where="`data.fraction` == 0.6")
    assert len(ids) == 1 and set(res.curves_for(ids)["trial_id"]) == set(ids)
    assert res.trials.set_index("trial_id").loc[ids[0], "phase"] == "grokking"
    # Liu et al.'s rule calls grokking only a gap of more than 1,000 steps: within 400 steps, this
    # is comprehension. The study's own results stay, and its redraw goes beside its figures.
    liu = res.relabel("liu2022")
    assert liu.trials.set_index("trial_id").loc[ids[0], "phase"] == "comprehension"
    assert res.trials.set_index("trial_id").loc[ids[0], "phase"] == "grokking"
    assert liu.phase_diagram().get_suptitle().startswith("resume (phases by rule liu2022)")
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "out"), "--rule", "liu2022", "--format", "png"]) == 0
    printed = capsys.readouterr().out.splitlines()
    changed = (liu.trials["phase"] != res.trials["phase"]).sum()
    assert printed[0].startswith(f"rule liu2022: {changed} of 2 trials and {changed} of 2 cells changed")
    assert "  optimizer.weight_decay=1.0, data.fraction=0.6: grokking -> comprehension" in printed
    assert (tmp_path / "out" / "figures" / "rule-liu2022" / "phase_diagram.png").is_file()
    # Read back from MLflow alone, a trial's model comes from its run's artifact.
    from_mlflow = grokstudy.load("resume", tracking_uri=res.tracking_uri)
    uri = from_mlflow.trials.set_index("trial_id").loc[ids[0], "weights_uri"]
    assert uri.startswith("runs:/") and uri.endswith(f"/weights/{ids[0]}.pt")
    here, there = res.model(ids[0]), from_mlflow.model(ids[0])
    mine, theirs = here.state_dict(), there.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in mine.items())
    with pytest.raises(UsageError, match="no trial 'nope'"):
        res.model("nope")
    with pytest.raises(UsageError, match="does not exist|neither|not a file"):
        grokstudy.load(tmp_path / "missing")

    monkeypatch.setenv("GROKSTUDY_STUDY", str(tmp_path / "out"))
    namespace = run_notebook(NOTEBOOK)
    # It found a trial that generalized, loaded its model and read a spectrum off its embedding.
    assert namespace["chosen"] and namespace["model"].trial_id == namespace["trial_id"]
    share = namespace["share"]
    assert share.shape == (11,) and abs(float(share.sum()) - 1) < 1e-9  # p = 23: frequencies 1..11
    # ...and took Nanda et al.'s progress measures on it and on its initialisation, where no
    # frequency stands out (the science is tests/test_measures.py's, on a transformer).
    progress, at_start = namespace["progress"], namespace["at_start"]
    assert set(progress) == set(at_start) == set(measures.PROGRESS_MEASURES)
    assert all(math.isfinite(v) and v >= 0 for v in [*progress.values(), *at_start.values()])
    assert at_start["key_frequencies"] == 0 and progress["key_frequencies"] == int(
        progress["key_frequencies"]
    )
