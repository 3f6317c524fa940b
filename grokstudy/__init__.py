"""grokstudy: distributed phase-diagram studies of grokking.

    import grokstudy
    res = grokstudy.load("runs/quickstart")     # Results: trials/curves/cells data frames, figures
    model = res.model(trial_id)                 # a finished trial's trained model
    res = grokstudy.run("studies/quickstart.yaml")

The names below come from `grokstudy.api`, imported on first use: `import grokstudy` stays cheap
for the trial workers and the CLI.
"""

__version__ = "0.1.0"
__all__ = ["Results", "load", "load_model", "run", "__version__"]


def __getattr__(name: str):
    if name in ("Results", "load", "load_model", "run"):
        from grokstudy import api

        return getattr(api, name)
    raise AttributeError(f"module 'grokstudy' has no attribute {name!r}")
