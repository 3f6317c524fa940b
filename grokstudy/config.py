"""Frozen configuration dataclasses: the vocabulary every module shares.

Field names are the study file's dotted paths (`optimizer.weight_decay` is
`TrialConfig.optimizer.weight_decay`), so one name means one thing in YAML,
Python, MLflow params and Parquet columns. Only `study.py` builds these from
user text and validates them; here are types, defaults and derived values.
Standard library only: importing this costs nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# ---- one trial ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskConfig:
    """The algorithmic table to learn (Power et al. 2022)."""

    op: str = "x+y"
    """Binary operation: x+y, x-y, x*y, x/y, x^2+y^2, x^2+xy+y^2, x^3+xy, or perm (composition in S_n)."""
    p: int = 97
    """Modulus of the arithmetic operations (x/y needs a prime)."""
    n: int = 5
    """Degree of the symmetric group for op=perm (S_5 has 120 elements, 14,400 pairs)."""


@dataclass(frozen=True, slots=True)
class DataConfig:
    fraction: float = 0.3
    """Share of all pairs of the table used for training; the rest is validation."""
    split_seed: int = 0
    """Seed of the train/validation split, separate from `train.seed` (the init seed)."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    kind: str = "mlp"
    """mlp | transformer | gromov (one-hot operands, quadratic activation, no biases)."""
    embed_dim: int = 128
    """Token embedding size (the transformer's d_model); unused by gromov."""
    width: int = 512
    """Hidden width of the MLP and gromov models; MLP width inside each transformer block."""
    depth: int = 1
    """Hidden layers of the MLP; blocks of the transformer."""
    heads: int = 4
    """Attention heads of the transformer (embed_dim must divide by it)."""
    activation: str = "relu"
    """relu | gelu | quadratic (gromov always uses quadratic)."""
    layer_norm: bool = False
    """Pre-LN blocks in the transformer; Nanda et al.'s model has none."""
    init_scale: float = 1.0
    """Multiplier on every initial weight (Omnigrok's alpha; > 1 induces grokking)."""


@dataclass(frozen=True, slots=True)
class OptimConfig:
    name: str = "adamw"
    """adamw (decoupled decay) | adam (coupled L2) | sgd (coupled L2) | rmsprop (coupled L2)."""
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    momentum: float = 0.0
    """SGD and RMSprop momentum."""
    nesterov: bool = False
    weight_decay: float = 1.0
    decay_to: str = "zero"
    """zero | init: pull weights toward the origin or toward their initial values."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up from lr/warmup_steps to lr (Power et al. use 10)."""
    grokfast: str = "none"
    """none | ema | ma: Grokfast slow-gradient amplification (Lee et al. 2024)."""
    grokfast_alpha: float = 0.98
    grokfast_lamb: float = 2.0
    grokfast_window: int = 100
    orthograd: bool = False
    """Project each gradient orthogonal to its weights (Prieto et al. 2025's ⊥Grad)."""

    @property
    def weight_decay_form(self) -> str:
        """How the decay enters the update, spelt out so studies never confuse them."""
        coupling = "decoupled" if self.name == "adamw" else "coupled_l2"
        return f"{coupling}_to_{self.decay_to}"


@dataclass(frozen=True, slots=True)
class TrainConfig:
    max_steps: int = 10_000
    """Budget in optimizer steps."""
    batch_size: int | None = None
    """None (YAML `full`) trains full-batch; otherwise minibatches drawn by `seed`."""
    loss: str = "cross_entropy"
    """cross_entropy (float64 log-softmax) | mse (one-hot targets) | stablemax."""
    seed: int = 0
    """Init seed (and minibatch order); replicates of a study point differ only here."""
    eval_every: int = 100
    """Evaluate every this many steps, plus a few log-spaced early steps."""
    checkpoint_every: int = 1000
    """Save the full training state every this many steps (a multiple of eval_every)."""
    device: str = "auto"
    """auto | cpu | cuda."""


@dataclass(frozen=True, slots=True)
class TrialConfig:
    """Everything that determines one training run, and nothing else."""

    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---- how a curve is read ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PhaseConfig:
    """Parameters of the phase rule in `phases.py` (after Liu et al. 2022)."""

    threshold: float = 0.99
    """Accuracy that counts as fitted (train) or generalized (validation)."""
    grok_delay_factor: float = 5.0
    """Grokking needs t_val >= factor * t_train ..."""
    min_delay: int = 500
    """... and t_val - t_train >= min_delay steps; otherwise it is comprehension."""
    margin: float = 0.05
    """Generalization holds while val accuracy stays >= threshold - margin."""
    confirm_steps: int = 1000
    """A trial may stop early once generalization has held this many steps."""


# ---- a study -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SearchDim:
    """One searched key. Exactly one of the forms is set."""

    key: str
    """Dotted path into TrialConfig, e.g. optimizer.weight_decay."""
    log: tuple[float, float] | None = None
    range: tuple[float, float] | None = None
    points: int | None = None
    """Grid points of a log/range dimension (required by the grid sampler)."""
    values: tuple[Any, ...] | None = None
    """Explicit numeric values."""
    choice: tuple[Any, ...] | None = None
    """Categorical choices."""
    integer: bool = False
    """Round the sampled value to an int (e.g. model.width)."""

    @property
    def grid(self) -> tuple[Any, ...]:
        """The dimension's grid values (log/range need `points`)."""
        if self.values is not None:
            return self.values
        if self.choice is not None:
            return self.choice
        assert self.points is not None, f"{self.key} has no grid points"
        if self.log is not None:
            lo, hi = self.log
            n = self.points
            out = [lo * (hi / lo) ** (i / (n - 1)) if n > 1 else lo for i in range(n)]
        else:
            assert self.range is not None
            lo, hi = self.range
            n = self.points
            out = [lo + (hi - lo) * i / (n - 1) if n > 1 else lo for i in range(n)]
        if self.integer:
            return tuple(int(round(v)) for v in out)
        return tuple(float(f"{v:.6g}") for v in out)

    @property
    def is_log(self) -> bool:
        """True when the axis is best drawn on a log scale."""
        if self.log is not None:
            return True
        vals = self.values
        if vals and all(isinstance(v, (int, float)) and v > 0 for v in vals) and len(vals) > 2:
            return max(vals) / min(vals) >= 100
        return False


@dataclass(frozen=True, slots=True)
class SearchConfig:
    sampler: str = "grid"
    """grid | sobol | random | tpe."""
    space: tuple[SearchDim, ...] = ()
    seeds: int = 1
    """Replicates per point: train.seed takes 0 .. seeds-1."""
    num_samples: int | None = None
    """Points drawn by sobol/random/tpe (grid: the grid's size)."""
    objective: str = "t_val"
    """What tpe minimizes: t_val (steps to generalize; the budget if never)."""
    sampler_seed: int = 0


@dataclass(frozen=True, slots=True)
class ResourcesConfig:
    cpu: float = 1.0
    gpu: float = 0.0


@dataclass(frozen=True, slots=True)
class RunConfig:
    max_concurrent: int | None = None
    max_failures: int = 3
    """Retries of a failed trial, each from its last checkpoint."""
    out: str | None = None
    """Output directory; default runs/<name>."""
    storage: str | None = None
    """Ray Tune storage_path (s3://, gs://, an NFS path); default <out>/ray."""
    tracking_uri: str | None = None
    """MLflow tracking URI; default sqlite:///<out>/mlflow.db (absolute)."""
    optuna_storage: str | None = None
    """SQLAlchemy URL of the Optuna study; default sqlite:///<out>/optuna.db."""


@dataclass(frozen=True, slots=True)
class DiagramConfig:
    x: str = "data.fraction"
    y: str = "optimizer.weight_decay"
    facet: str | None = None


@dataclass(frozen=True, slots=True)
class Study:
    """A validated study file: a base trial, a search over it, and how to run it."""

    name: str
    base: TrialConfig = field(default_factory=TrialConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    phases: PhaseConfig = field(default_factory=PhaseConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    run: RunConfig = field(default_factory=RunConfig)
    diagram: DiagramConfig = field(default_factory=DiagramConfig)

    def trial(self, point: dict[str, Any]) -> TrialConfig:
        """The base trial with a search point's dotted keys set."""
        return with_overrides(self.base, point)


TRIAL_SECTIONS = ("task", "data", "model", "optimizer", "train")


# ---- dotted paths ----------------------------------------------------------------


def with_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """`dataclasses.replace` along dotted paths: {"optimizer.lr": 1e-2}."""
    for path, value in overrides.items():
        cfg = _replace_path(cfg, path.split("."), value)
    return cfg


def _replace_path(obj: Any, parts: list[str], value: Any) -> Any:
    head, rest = parts[0], parts[1:]
    if not rest:
        return dataclasses.replace(obj, **{head: value})
    return dataclasses.replace(obj, **{head: _replace_path(getattr(obj, head), rest, value)})


def get_path(cfg: Any, path: str) -> Any:
    """The value at a dotted path: get_path(trial, "optimizer.lr")."""
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted path: leaf value} of a (nested) dataclass; tuples stay tuples."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists): JSON/YAML-ready."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def trial_from_dict(d: dict[str, Any]) -> TrialConfig:
    """Inverse of `to_dict` for a TrialConfig (e.g. a checkpoint's config.json)."""
    sections = {
        "task": TaskConfig,
        "data": DataConfig,
        "model": ModelConfig,
        "optimizer": OptimConfig,
        "train": TrainConfig,
    }
    kwargs = {}
    for name, cls in sections.items():
        values = dict(d.get(name, {}))
        if name == "optimizer" and "betas" in values:
            values["betas"] = tuple(values["betas"])
        kwargs[name] = cls(**values)
    return TrialConfig(**kwargs)
