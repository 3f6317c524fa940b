"""Frozen configuration dataclasses: the vocabulary every module shares, and its rules.

Field names are the study file's dotted paths (`optimizer.weight_decay` is
`TrialConfig.optimizer.weight_decay`), so one name means one thing in YAML,
Python, MLflow params and Parquet columns. Each field carries its own rule in
its metadata (`setting(...)`: the doc, the allowed range or choices, the unit):
`study.py` checks study files and `--set` against it, `validate_trial` checks a
built trial against the same rules (the training core calls it once), and the
Parquet schemas take their column docs and units from it. Rules that tie
fields together are `cross_problems`, shared the same way.

Standard library only: importing this costs nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice, product
from typing import Any, get_type_hints

from grokstudy.errors import StudyError, raise_all

# ---- the rule of one field -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spec:
    """What a field holds and which values are allowed (read by `check_value`)."""

    doc: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    """True: the value must be > lo (else >= lo)."""
    hi_open: bool = False
    choices: tuple[str, ...] | None = None
    unit: str | None = None
    allowed: str | None = None
    """The rule in words, when the range alone does not say it."""
    whole_above_one: bool = False
    """Ray resources: fractions only below 1, whole units above."""


def setting(default: Any, doc: str, **rule: Any) -> Any:
    """A dataclass field with its rule: `weight_decay: float = setting(1.0, "...", lo=0)`."""
    return field(default=default, metadata={"spec": Spec(doc, **rule)})


def allowed_text(name: str, spec: Spec, integer: bool) -> str:
    """The allowed range in words: `0 < fraction < 1`, `an integer, 1 <= seeds <= 1000`."""
    if spec.allowed:
        return spec.allowed
    if spec.lo is None and spec.hi is None:
        return "any value"
    if spec.hi is None:  # `x >= 1` reads better than `1 <= x`
        text = f"{name} {'>' if spec.lo_open else '>='} {_num(spec.lo)}"
    else:
        low = "" if spec.lo is None else f"{_num(spec.lo)} {'<' if spec.lo_open else '<='} "
        text = f"{low}{name} {'<' if spec.hi_open else '<='} {_num(spec.hi)}"
    return f"an integer, {text}" if integer else text


def check_value(name: str, spec: Spec, value: Any) -> str | None:
    """Why `value` breaks `spec` (one line, without the path), or None when it is allowed.

    Numbers are checked against the range (tuples element-wise); strings against
    the choices. None passes (a nullable field's "unset"); types are the caller's.
    """
    if value is None:
        return None
    if spec.choices is not None:
        if value in spec.choices:
            return None
        hint = did_you_mean(str(value), spec.choices)
        return f"unknown {name} (got {show(value)}){hint} allowed: {', '.join(spec.choices)}"
    items = value if isinstance(value, tuple) else (value,)
    integer = all(isinstance(v, int) and not isinstance(v, bool) for v in items)
    for v in filter(is_number, items):
        bad = (
            (spec.lo is not None and (v <= spec.lo if spec.lo_open else v < spec.lo))
            or (spec.hi is not None and (v >= spec.hi if spec.hi_open else v > spec.hi))
            or (spec.whole_above_one and v > 1 and not float(v).is_integer())
        )
        if bad:
            return f"out of range (got {show(value)}); allowed: {allowed_text(name, spec, integer)}"
    return None


def is_number(v: Any) -> bool:
    """An int or a float, and not a bool (which Python counts as an int)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v: float) -> str:
    if float(v).is_integer() and abs(v) >= 2**20:
        exp = math.log2(v + 1) if v > 0 else 0
        if exp.is_integer():
            return f"2**{int(exp)} - 1"
        return f"{v:.0e}".replace("e+0", "e").replace("e+", "e")
    return f"{v:g}" if isinstance(v, float) else str(v)


def did_you_mean(value: str, choices: Sequence[str], cutoff: float = 0.5) -> str:
    """`; did you mean 'x'?` for the closest of `choices`, or "" if none is close."""
    import difflib

    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""


def show(v: Any, limit: int = 80) -> str:
    """A value as the user wrote it in YAML, cut to `limit` characters (error lines stay short)."""
    text = _show(v, [limit * 2])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(v: Any, budget: list[int]) -> str:
    # `budget` stops the walk of a huge (or alias-bombed) structure early.
    budget[0] -= 1
    if budget[0] < 0:
        return "..."
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:g}" if 1e-4 <= abs(v) < 1e6 or v == 0 else repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show(x, budget) for x in v[:20]) + (", ..." if len(v) > 20 else "") + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_show(x, budget)}" for k, x in islice(v.items(), 20)) + "}"
    return str(v)


SEED_MAX = 2**32 - 1
STEPS_MAX = 10**9
"""The largest step count anywhere (budgets, intervals): a bigger one is a typo."""

OPS = ("x+y", "x-y", "x*y", "x/y", "x^2+y^2", "x^2+xy+y^2", "x^3+xy", "perm")
"""`task.op`; tasks.OPERATIONS implements each (tests/test_study.py checks they agree)."""

# ---- one trial ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskConfig:
    """The algorithmic table to learn (Power et al. 2022)."""

    op: str = setting("x+y", "binary operation; perm is composition in S_n", choices=OPS)
    # tasks.py builds at most 2**24 pairs: p <= 4096.
    p: int = setting(97, "modulus of the arithmetic operations (x/y needs a prime)", lo=2, hi=4096)
    n: int = setting(5, "degree of the symmetric group for op=perm (S_5: 120 elements)", lo=2, hi=6)


@dataclass(frozen=True, slots=True)
class DataConfig:
    fraction: float = setting(
        0.3,
        "share of all pairs of the table used for training; the rest is validation",
        lo=0,
        hi=1,
        lo_open=True,
        hi_open=True,
        unit="fraction of all pairs",
    )
    split_seed: int = setting(
        0, "seed of the train/validation split, separate from train.seed (the init seed)", lo=0, hi=SEED_MAX
    )


@dataclass(frozen=True, slots=True)
class ModelConfig:
    kind: str = setting(
        "mlp",
        "mlp | transformer | gromov (one-hot operands, quadratic activation, no biases)",
        choices=("mlp", "transformer", "gromov"),
    )
    embed_dim: int = setting(
        128, "token embedding size (the transformer's d_model); unused by gromov", lo=1, hi=8192
    )
    width: int = setting(
        512,
        "hidden width of the MLP and gromov models; MLP width inside each transformer block",
        lo=1,
        hi=65536,
    )
    depth: int = setting(1, "hidden layers of the MLP; blocks of the transformer", lo=1, hi=64)
    heads: int = setting(4, "attention heads of the transformer (embed_dim must divide by it)", lo=1, hi=256)
    activation: str = setting(
        "relu",
        "relu | gelu | quadratic (gromov always uses quadratic)",
        choices=("relu", "gelu", "quadratic"),
    )
    layer_norm: bool = setting(False, "pre-LN blocks in the transformer; Nanda et al.'s model has none")
    inputs: str = setting(
        "embed",
        "how the mlp reads its operands: embed (one embedding table for both, concatenated) or "
        "onehot (one-hot(a) ‖ one-hot(b) into the first layer, nn.Linear's init, as Prieto et "
        "al.'s MLP; embed_dim unused); the transformer embeds, gromov reads one-hot, either way",
        choices=("embed", "onehot"),
    )
    bias: bool = setting(
        True,
        "biases in the mlp's layers and the transformer's FFN (its attention and unembedding have "
        "none either way, as Nanda et al.'s); false as Power et al.'s transformer and Prieto et "
        "al.'s MLP; gromov has none either way",
    )
    init_scale: float = setting(
        1.0,
        "multiplier on every initial weight (Omnigrok's alpha; > 1 induces grokking)",
        lo=0,
        hi=1e6,
        lo_open=True,
    )
    embed_std: float | None = setting(
        None,
        "standard deviation of the token embeddings at init, before init_scale (null: the model's "
        "own: 1/sqrt(embed_dim) in the transformer, as Nanda et al.'s; 1 in the mlp, torch's "
        "nn.Embedding; 1.0 in a transformer is Grokfast's code); gromov has no embedding",
        lo=0,
        hi=1e3,
        lo_open=True,
        allowed="0 < embed_std <= 1000, or null for the model's own",
    )


@dataclass(frozen=True, slots=True)
class OptimConfig:
    name: str = setting(
        "adamw",
        "adamw (decoupled decay) | adam (coupled L2) | sgd (coupled L2) | rmsprop (coupled L2)",
        choices=("adamw", "adam", "sgd", "rmsprop"),
    )
    lr: float = setting(
        1e-3, "peak learning rate, reached after optimizer.warmup_steps", lo=0, hi=1e3, lo_open=True
    )
    betas: tuple[float, float] = setting(
        (0.9, 0.98),
        "Adam/AdamW/RMSprop moment decay rates (beta1, beta2)",
        lo=0,
        hi=1,
        hi_open=True,
        allowed="two numbers in [0, 1)",
    )
    eps: float = setting(1e-8, "Adam-family denominator epsilon", lo=0, hi=1, lo_open=True)
    momentum: float = setting(0.0, "SGD and RMSprop momentum", lo=0, hi=1, hi_open=True)
    nesterov: bool = setting(False, "Nesterov momentum for SGD")
    weight_decay: float = setting(
        1.0, "weight-decay coefficient; how it enters is optimizer.weight_decay_form", lo=0, hi=1e6
    )
    decay_biases: bool = setting(
        False,
        "decay every tensor, biases and norm gains too (Nanda et al. 2023); default: matrices and "
        "embeddings only (models.decay_groups)",
    )
    decay_to: str = setting(
        "zero",
        "zero | init: pull weights toward the origin or toward their initial values",
        choices=("zero", "init"),
    )
    warmup_steps: int = setting(
        10,
        "linear learning-rate warm-up over this many steps to lr (Power et al. and Nanda et al. use 10)",
        lo=0,
        hi=STEPS_MAX,
        unit="steps",
    )
    warmup_start: str = setting(
        "lr/steps",
        "lr/steps: the first step's lr is lr/warmup_steps (Power et al.) | zero: it is 0, as "
        "Nanda et al.'s LambdaLR(min(step/10, 1)) gives",
        choices=("lr/steps", "zero"),
    )
    grokfast: str = setting(
        "none",
        "none | ema | ma: Grokfast slow-gradient amplification (Lee et al. 2024)",
        choices=("none", "ema", "ma"),
    )
    grokfast_alpha: float = setting(0.98, "Grokfast EMA decay of the slow gradient", lo=0, hi=1, hi_open=True)
    grokfast_lamb: float = setting(2.0, "Grokfast amplification of the slow gradient", lo=0, hi=1e6)
    grokfast_window: int = setting(
        100, "Grokfast-MA window of past gradients", lo=1, hi=100_000, unit="steps"
    )
    orthograd: bool = setting(
        False, "project each gradient orthogonal to its weights (Prieto et al. 2025's ⊥Grad)"
    )

    @property
    def weight_decay_form(self) -> str:
        """How the decay enters the update, spelt out so studies never confuse them."""
        coupling = "decoupled" if self.name == "adamw" else "coupled_l2"
        return f"{coupling}_to_{self.decay_to}"


@dataclass(frozen=True, slots=True)
class TrainConfig:
    max_steps: int = setting(10_000, "budget in optimizer steps", lo=1, hi=STEPS_MAX, unit="steps")
    batch_size: int | None = setting(
        None,
        "None (YAML `full`) trains full-batch; otherwise minibatches drawn by train.seed",
        lo=1,
        hi=2**24,
        unit="examples",
        allowed="an integer, 1 <= batch_size <= 2**24, or full",
    )
    batch_fraction: float | None = setting(
        None,
        "a batch holds at most ceil(batch_fraction * n_train) pairs (null: no such cap); Power et "
        "al.'s rule min(512, ceil(n_train / 2)) is batch_size 512 with batch_fraction 0.5",
        lo=0,
        hi=1,
        lo_open=True,
    )
    loss: str = setting(
        "cross_entropy",
        "cross_entropy (float64 log-softmax) | mse (one-hot targets) | stablemax | "
        "cross_entropy_float32 (only to reproduce softmax collapse, Prieto et al. 2025)",
        choices=("cross_entropy", "mse", "stablemax", "cross_entropy_float32"),
    )
    seed: int = setting(
        0, "init seed (and minibatch order); replicates of a point differ only here", lo=0, hi=SEED_MAX
    )
    eval_every: int = setting(
        100,
        "evaluate every this many steps, plus a few log-spaced early steps",
        lo=1,
        hi=STEPS_MAX,
        unit="steps",
    )
    measures_every: int = setting(
        1,
        "take Nanda et al.'s progress measures (restricted and excluded loss, key frequencies) at "
        "every this many-th evaluation; 0 never (they cost two forward passes over the table)",
        lo=0,
        hi=STEPS_MAX,
        unit="evaluations",
    )
    checkpoint_every: int = setting(
        1000,
        "save the full training state every this many steps (a multiple of eval_every)",
        lo=1,
        hi=STEPS_MAX,
        unit="steps",
    )
    device: str = setting("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    matmul_precision: str = setting(
        "highest",
        "float32 matmuls on a GPU: highest (true fp32) or high (TF32 tensor cores on Ampere and "
        "later: 10-bit mantissa products, several times the fp32 rate); the logits stay float32 "
        "and the loss float64 either way; no effect on CPUs",
        choices=("highest", "high"),
    )


@dataclass(frozen=True, slots=True)
class TrialConfig:
    """Everything that determines one training run, and nothing else."""

    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---- how a curve is read -----------------------------------------------------------------------


PHASE_RULES: dict[str, dict[str, float]] = {
    "default": {},
    "liu2022": {"threshold": 0.9, "grok_delay_factor": 1.0, "min_delay": 1001, "margin": 0.9},
}
"""Named phase rules: the values `phases.rule` sets (keys given in the study still win).
`liu2022` is Liu et al. 2022's: accuracy 0.9, grokking = validation more than 1,000 steps
after training, no ratio, no hold (phases.py's docstring)."""


@dataclass(frozen=True, slots=True)
class PhaseConfig:
    """Parameters of the phase rule in `phases.py` (after Liu et al. 2022)."""

    rule: str = setting(
        "default",
        "default | liu2022: a named rule whose values the other keys default to (phases.py)",
        choices=tuple(PHASE_RULES),
    )
    threshold: float = setting(
        0.99, "accuracy that counts as fitted (train) or generalized (validation)", lo=0, hi=1, lo_open=True
    )
    grok_delay_factor: float = setting(5.0, "grokking needs t_val >= factor * t_train ...", lo=1, hi=1e6)
    min_delay: int = setting(
        500, "... and t_val - t_train >= min_delay steps; otherwise it is comprehension", lo=0, hi=STEPS_MAX
    )
    margin: float = setting(
        0.05, "generalization holds while val accuracy stays >= threshold - margin", lo=0, hi=1, hi_open=True
    )
    plateau_max: float | None = setting(
        None,
        "grokking also needs val accuracy at t_train <= plateau_max (near chance when the training "
        "set was fitted: a plateau, then the jump); a run that fails it is comprehension; null: off",
        lo=0,
        hi=1,
        allowed="0 <= plateau_max <= 1, or null (off)",
    )
    confirm_steps: int = setting(
        1000,
        "a trial may stop early once generalization has held this many steps; a dip shorter "
        "than this is forgiven",
        lo=0,
        hi=STEPS_MAX,
    )
    loss_threshold: float = setting(
        1e-2,
        "t_val_loss: the validation loss that counts as generalized (Nanda et al. 2023: 1e-2)",
        lo=0,
        hi=1e6,
        lo_open=True,
    )
    early_stop: str = setting(
        "accuracy",
        "stop a trial once generalization has held confirm_steps: by accuracy, by accuracy and "
        "val loss (needed when t_val_loss is the measure), or never (full curves)",
        choices=("accuracy", "accuracy_and_loss", "never"),
    )


# ---- a study -----------------------------------------------------------------------------------


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
        explicit = self.values if self.values is not None else self.choice
        if explicit is not None:
            return explicit
        assert self.points is not None, f"{self.key} has no grid points"
        lo, hi = self.log or self.range or (0.0, 0.0)
        n = self.points
        if self.log is not None:
            out = [lo * (hi / lo) ** (i / (n - 1)) if n > 1 else lo for i in range(n)]
        else:
            out = [lo + (hi - lo) * i / (n - 1) if n > 1 else lo for i in range(n)]
        if self.integer:
            return tuple(int(round(v)) for v in out)
        return tuple(float(f"{v:.6g}") for v in out)

    @property
    def is_discrete(self) -> bool:
        """Has a finite grid: explicit values or choices, or a log/range with `points`."""
        return self.values is not None or self.choice is not None or self.points is not None

    @property
    def is_listed(self) -> bool:
        """Its values are listed in the study file (values or choice): every sampler draws from the
        list, never from a range."""
        return self.values is not None or self.choice is not None

    @property
    def is_log(self) -> bool:
        """Is this axis drawn (and its figure cells spaced) on a log scale: a log: dimension,
        or `values` that `is_log_scale` calls so."""
        return self.log is not None or (self.values is not None and is_log_scale(self.values))


def is_log_scale(values: Sequence[Any]) -> bool:
    """The one rule of a numeric axis's scale, for studies and figures alike: more than two
    values, all > 0 (a 0 may join them: figures give it its own slot), spanning at least
    two decades."""
    nums = [v for v in values if is_number(v)]
    positive = [v for v in nums if v > 0]
    if len(nums) != len(values) or any(v < 0 for v in nums) or len(positive) < 2 or len(nums) <= 2:
        return False
    return max(positive) / min(positive) >= 100


SAMPLERS = ("grid", "sobol", "random", "tpe", "boundary")
LATTICE_SAMPLERS = ("grid", "boundary")
"""Samplers over the study's grid: every log/range axis needs `points`, and figures draw cells."""


@dataclass(frozen=True, slots=True)
class SearchConfig:
    sampler: str = setting(
        "grid",
        "grid | sobol | random | tpe | boundary (the grid's phase diagram, trained only where phases change)",
        choices=SAMPLERS,
    )
    space: tuple[SearchDim, ...] = ()
    seeds: int = setting(1, "replicates per point: train.seed takes 0 .. seeds-1", lo=1, hi=1000)
    vary_split: bool = setting(
        False,
        "replicates differ in their train/validation split too: replicate s uses "
        "data.split_seed + s (false: every replicate shares data.split_seed, and seed agreement "
        "measures only the init's spread)",
    )
    num_samples: int | None = setting(
        None, "points drawn by sobol/random/tpe (grid: the grid's size)", lo=1, hi=10**6
    )
    objective: str = setting(
        "t_val", "what tpe minimizes: t_val (steps to generalize; the budget if never)", choices=("t_val",)
    )
    sampler_seed: int = setting(0, "seed of the sampler", lo=0, hi=SEED_MAX)
    budget: int | None = setting(
        None,
        "boundary sampler: hand out at most this many trials (null: until no boundary is left unresolved)",
        lo=1,
        hi=10**6,
        allowed="an integer >= 1, or null",
    )

    @property
    def grid_size(self) -> int | None:
        """Points of the grid of every axis (None: an axis has no grid)."""
        if not all(d.is_discrete for d in self.space):
            return None
        return math.prod(len(d.grid) for d in self.space)

    @property
    def n_points(self) -> int | None:
        """Distinct hyperparameter points: the grid's size for a lattice sampler (the boundary
        sampler's at most), else num_samples."""
        return self.grid_size if self.sampler in LATTICE_SAMPLERS else self.num_samples

    @property
    def n_trials(self) -> int | None:
        """Training runs: points x seeds; None for the boundary sampler, which decides as results
        come in (at most n_points x seeds, or `budget`)."""
        if self.sampler == "boundary" or self.n_points is None:
            return None
        return self.n_points * self.seeds


@dataclass(frozen=True, slots=True)
class ResourcesConfig:
    cpu: float = setting(
        1.0,
        "CPUs per trial",
        lo=0,
        hi=1024,
        lo_open=True,
        whole_above_one=True,
        allowed="0 < cpu <= 1024; whole numbers above 1",
    )
    gpu: float = setting(
        0.0,
        "GPUs per trial",
        lo=0,
        hi=64,
        whole_above_one=True,
        allowed="0 <= gpu <= 64; a fraction below 1 or a whole number",
    )
    pack: int | str | None = setting(
        None,
        "trials trained together as one stacked model in one process (packed.py); auto: the "
        "smallest K within 5% of the best member-steps/s measured at K = 1, 2, 4, ... on the "
        "trials' device before the study starts (packsize.py); null: auto where trials use a "
        "GPU, 1 (no packing) on CPUs",
        lo=1,
        hi=4096,
        allowed="an integer, 1 <= pack <= 4096, auto, or null for the default",
    )


@dataclass(frozen=True, slots=True)
class RunConfig:
    max_concurrent: int | None = setting(
        None,
        "trials running at once (null: as many as the cluster fits)",
        lo=1,
        hi=10**6,
        allowed="an integer >= 1, or null for no limit",
    )
    max_failures: int = setting(3, "retries of a failed trial, each from its last checkpoint", lo=0, hi=100)
    out: str | None = setting(None, "output directory; default runs/<name>")
    storage: str | None = setting(
        None, "Ray Tune storage_path (s3://, gs://, an NFS path); default <out>/ray"
    )
    tracking_uri: str | None = setting(
        None, "MLflow tracking URI; default sqlite:///<out>/mlflow.db (absolute)"
    )
    results_every: int = setting(
        10,
        "while the study runs, rewrite its tables and figures (and the parent run's diagram) "
        "after this many more trials finished",
        lo=1,
        hi=10**6,
    )
    results_every_s: float = setting(
        300.0,
        "... or after this long, whichever comes first (trials still training are drawn as running)",
        lo=10,
        hi=10**6,
        unit="seconds",
    )
    resource_wait_s: float = setting(
        900.0,
        "on a cluster, how long a study waits for a node that can run a trial (an autoscaler "
        "adding one) before it fails; an embedded Ray refuses at once",
        lo=0,
        hi=10**6,
        unit="seconds",
    )
    save_weights: str = setting(
        "final",
        "final: keep each trial's weights when it ends (<storage>/<name>/weights/<trial_id>.pt, its "
        "MLflow run's weights/ artifact, trials.parquet's weights_uri); none: keep none",
        choices=("final", "none"),
    )
    tracking_outage_s: float = setting(
        600.0,
        "how long trials keep training while MLflow cannot be reached before the study stops "
        "(checkpoints kept: run it again to resume)",
        lo=1,
        hi=10**6,
        unit="seconds",
    )


@dataclass(frozen=True, slots=True)
class DiagramConfig:
    x: str = setting("data.fraction", "the phase diagram's x axis: a dotted trial key")
    y: str = setting("optimizer.weight_decay", "its y axis: a dotted trial key")
    facet: str | None = setting(None, "one panel per value of this dotted trial key (null: one panel)")
    labels: dict[str, str] | None = setting(
        None,
        "axis labels by dotted key, over the figures' own words (weight decay, training fraction, ...)",
        allowed="a mapping of dotted trial keys to text",
    )


@dataclass(frozen=True, slots=True)
class DecayTimeBudget:
    """Each point's step budget is K weight-decay time constants 1/(lr * weight_decay), rounded up
    to a whole evaluation and kept within [A, B] (B where lr * weight_decay is 0): the grokking
    delay scales as 1/weight_decay (Omnigrok, Liu et al. 2023), so one fixed budget is long where
    decay is large and censors points where it is small.

    A study file's `train.max_steps: {auto: {per_decay_time: K, min: A, max: B}}`."""

    per_decay_time: float = setting(
        dataclasses.MISSING,
        "K: steps per point = K / (lr * weight_decay); figures hatch memorization under 10",
        lo=0,
        hi=10**6,
        lo_open=True,
        unit="weight-decay time constants",
    )
    min: int = setting(
        dataclasses.MISSING, "A: the fewest steps a point gets", lo=1, hi=STEPS_MAX, unit="steps"
    )
    max: int = setting(
        dataclasses.MISSING,
        "B: the most steps a point gets, and every point's where lr * weight_decay is 0",
        lo=1,
        hi=STEPS_MAX,
        unit="steps",
    )

    def steps(self, lr: float, weight_decay: float, eval_every: int) -> int:
        """clip(round_up(K / (lr * weight_decay), eval_every), min, max)."""
        rate = lr * weight_decay
        if rate <= 0 or self.per_decay_time / rate >= self.max:
            return self.max
        # A hair of tolerance: 10 / (1e-3 * 1) is 10000.000000000002, one evaluation too many.
        evals = math.ceil(self.per_decay_time / rate / eval_every * (1 - 1e-9))
        return min(max(evals * eval_every, self.min), self.max)


@dataclass(frozen=True, slots=True)
class Conditional:
    """Settings for the trials whose point matches `when`: a study file's `conditional` entry,
    for arms that differ in more than their axis (e.g. StableMax trained with its own beta2)."""

    when: tuple[tuple[str, Any], ...]
    """(searched key, one of its values) pairs; all must match."""
    set: tuple[tuple[str, Any], ...]
    """(dotted trial key, value) pairs set on the matching trials; no searched key."""

    def matches(self, point: dict[str, Any]) -> bool:
        return all(key in point and point[key] == value for key, value in self.when)


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
    auto_max_steps: DecayTimeBudget | None = None
    """`train.max_steps: {auto: ...}`: each trial's budget from its lr and weight decay (the base
    trial holds the largest, `max`, which every check of a budget's upper end reads)."""
    conditional: tuple[Conditional, ...] = ()
    """Settings of the trials whose point matches, applied in order after the point's own."""

    def trial(self, point: dict[str, Any]) -> TrialConfig:
        """The base trial with a search point's dotted keys set, then the `conditional`
        settings its point matches (with `search.vary_split`, replicate s also splits the data
        with data.split_seed + s; with `auto_max_steps`, its budget follows its lr and weight
        decay)."""
        cfg = with_overrides(self.base, point)
        for c in self.conditional:
            if c.matches(point):
                cfg = with_overrides(cfg, dict(c.set))
        if self.search.vary_split:
            cfg = with_overrides(cfg, {"data.split_seed": cfg.data.split_seed + cfg.train.seed})
        if self.auto_max_steps is not None:
            o = cfg.optimizer
            steps = self.auto_max_steps.steps(o.lr, o.weight_decay, cfg.train.eval_every)
            cfg = with_overrides(cfg, {"train.max_steps": steps})
        return cfg


TRIAL_SECTIONS: dict[str, type] = get_type_hints(TrialConfig)
"""The sections of a TrialConfig, by name (its fields): the one section-to-class map."""
NOT_SECTIONS = ("name", "base", "auto_max_steps", "conditional")
"""A Study's fields that are no section of the study file (auto_max_steps is read from
train.max_steps; conditional is a list, read by `study._conditional`)."""
STUDY_SECTIONS: dict[str, type] = {
    **TRIAL_SECTIONS,
    **{name: cls for name, cls in get_type_hints(Study).items() if name not in NOT_SECTIONS},
}
"""Every section of a study file, by name: the trial's, then the rest of a Study's fields."""


# ---- rules that tie fields together ------------------------------------------------------------


def is_prime(n: int) -> bool:
    """Trial division; moduli here are small."""
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def nearest_primes(n: int) -> tuple[int | None, int]:
    """The largest prime below n (None if there is none) and the smallest above it."""
    below = next((q for q in range(n - 1, 1, -1) if is_prime(q)), None)
    above = next(q for q in range(n + 1, 2 * n + 3) if is_prime(q))
    return below, above


MAX_EVALS = 100_000
"""Eval points of one trial: max_steps / eval_every above this is a typo (the schedule is a list)."""


# Long on purpose: every rule that ties fields together, in one list a reader checks at once.
def cross_problems(
    values: Callable[[str, bool], list[Any] | None], skip: set[str] = frozenset()
) -> list[tuple[str, str]]:
    """(key, message) for every rule that ties trial keys together and is broken.

    `values(key, ends)` gives the values a key takes: one base value, a searched
    axis's grid, or for a continuous axis its two ends if `ends`, else None.
    Rules touching a key in `skip` (already reported) are not checked.
    """
    out: list[tuple[str, str]] = []

    def ok(*keys: str) -> bool:
        return not skip.intersection(keys)

    if ok("model.kind", "model.embed_std") and "gromov" in values("model.kind", False):
        if any(v is not None for v in values("model.embed_std", True) or ()):
            out.append(
                ("model.embed_std", "model.kind gromov has no embedding (one-hot operands): leave it out")
            )

    onehot = "onehot" in values("model.inputs", False)
    if ok("model.kind", "model.inputs") and onehot and "mlp" not in values("model.kind", False):
        out.append(("model.inputs", "onehot is an input of model.kind mlp (the transformer embeds, gromov "
                    "reads one-hot either way): leave it out"))  # fmt: skip
    if ok("model.inputs", "model.embed_std") and onehot:
        if any(v is not None for v in values("model.embed_std", True) or ()):
            out.append(("model.embed_std", "model.inputs onehot has no embedding table: leave it out"))

    if ok("task.op", "task.p") and "x/y" in values("task.op", False):
        ps = values("task.p", False)
        if ps is None:
            need = "x/y needs a prime modulus, which a range cannot guarantee; use values: [primes]"
            out.append(("task.p", need))
        elif (bad := next((p for p in ps if not is_prime(p)), None)) is not None:
            nearest = " or ".join(str(q) for q in nearest_primes(bad) if q)
            message = f"not prime (got {bad}); task.op x/y divides mod p; allowed: a prime, e.g. {nearest}"
            out.append(("task.p", message))

    keys = ("task.op", "task.p", "task.n", "data.fraction")
    if ok(*keys):
        for op, p, n, f in product(*(values(k, True) for k in keys)):
            pairs = math.factorial(n) ** 2 if op == "perm" else p * (p - 1 if op == "x/y" else p)
            if not 1 <= round(f * pairs) <= pairs - 1:
                empty = "training" if round(f * pairs) < 1 else "validation"
                out.append(("data.fraction", f"leaves an empty {empty} set (got {show(f)} of {pairs} pairs)"))
                break

    def multiple(key: str, of: str, why: str, allowed: Callable[[Any], str], ranges_ok: bool = False) -> None:
        """Every value of `key` a multiple of every value of `of` (ranges cannot promise it)."""
        nums, dens = values(key, False), values(of, False)
        if nums is None or dens is None:
            if not ranges_ok:
                out.append((key if nums is None else of, f"use values: [...] so that {why}"))
        elif pair := next(((a, b) for a, b in product(nums, dens) if a % b), None):
            a, b = pair
            got = f"got {a}, {of.split('.')[1]} {b}"
            out.append((key, f"not a multiple of {of} ({got}); {why}; allowed: {allowed(b)}"))

    if ok("model.kind", "model.embed_dim", "model.heads") and "transformer" in values("model.kind", False):
        one_head = values("model.heads", False) == [1]
        multiple(
            "model.embed_dim", "model.heads", "the transformer splits embed_dim across heads",
            lambda h: f"a multiple of {h}", ranges_ok=one_head,
        )  # fmt: skip
    if ok("train.checkpoint_every", "train.eval_every"):
        multiple(
            "train.checkpoint_every", "train.eval_every", "checkpoints are taken at evaluations",
            lambda e: f"{e}, {2 * e}, {3 * e}, ...",
        )  # fmt: skip

    if ok("train.max_steps", "train.eval_every"):
        for steps, every in product(values("train.max_steps", True), values("train.eval_every", True)):
            if steps / every > MAX_EVALS:
                evals = f"{steps} steps evaluated every {every} is {steps // every:,} eval points"
                out.append(
                    ("train.eval_every", f"{evals}; allowed: at most {MAX_EVALS:,} (raise eval_every)")
                )
                break

    keys = ("optimizer.name", "optimizer.nesterov", "optimizer.momentum")
    if ok(*keys) and "sgd" in values("optimizer.name", False) and True in values("optimizer.nesterov", False):
        if min(values("optimizer.momentum", True)) == 0:
            message = "SGD's Nesterov momentum needs optimizer.momentum > 0 (got momentum 0.0)"
            out.append(("optimizer.nesterov", message))
    return out


def validate_trial(cfg: TrialConfig) -> None:
    """Raise `StudyError`s (every problem, one line each) if `cfg` breaks a field or cross rule.

    The training core calls this once per trial; studies were already checked
    by `study.py` with the same rules, so for them it never fires.
    """
    problems: list[StudyError] = []
    for section, cls in TRIAL_SECTIONS.items():
        for f in dataclasses.fields(cls):
            spec = f.metadata.get("spec")
            message = spec and check_value(f.name, spec, get_path(cfg, f"{section}.{f.name}"))
            if message:
                problems.append(StudyError(f"{section}.{f.name}", message))
    flat = flatten(cfg)
    for key, message in cross_problems(lambda key, ends: [flat[key]], {e.path for e in problems}):
        problems.append(StudyError(key, message))
    raise_all(problems)


# ---- who may share a pack ---------------------------------------------------------------------

PACK_KEYS: tuple[str, ...] = (
    "task.op",
    "task.p",
    "task.n",
    "model.kind",
    "model.embed_dim",
    "model.width",
    "model.depth",
    "model.heads",
    "model.activation",
    "model.layer_norm",
    "model.bias",
    "model.inputs",
    "train.loss",
    "train.batch_size",
    "train.batch_fraction",
    "train.eval_every",
    "train.measures_every",
    "train.device",
    "train.matmul_precision",
    "optimizer.name",
    "optimizer.nesterov",
    "optimizer.decay_to",
    "optimizer.decay_biases",
    "optimizer.orthograd",
    "optimizer.grokfast",
)
"""Dotted paths every member of a pack shares (plus optimizer.grokfast_window under grokfast: ma):
what fixes the table, the model's shape and the optimizer's structure. Everything else a pack
holds per member (packed.py)."""


def batch_rows(train: TrainConfig, n_train: int) -> int:
    """Training rows in each step's batch for `n_train` training pairs: batch_size (all of them
    when full), at most ceil(batch_fraction * n_train), at most n_train. The one rule of a
    batch's size: the trainers, packs and memory estimates read it here."""
    rows = n_train if train.batch_size is None else min(train.batch_size, n_train)
    if train.batch_fraction is not None:
        rows = min(rows, math.ceil(train.batch_fraction * n_train))
    return max(rows, 1)


def pack_key(cfg: TrialConfig) -> tuple:
    """Trials with equal keys can share one pack (`packed.py`): `PACK_KEYS`, plus the Grokfast-MA
    window. A tuple of (dotted path, value) pairs, hashable."""
    key = tuple((path, get_path(cfg, path)) for path in PACK_KEYS)
    if cfg.optimizer.grokfast == "ma":
        key += (("optimizer.grokfast_window", cfg.optimizer.grokfast_window),)
    return key


# ---- dotted paths --------------------------------------------------------------------------------


def with_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """`dataclasses.replace` along dotted paths: {"optimizer.lr": 1e-2}."""
    for path, value in overrides.items():
        head, dot, rest = path.partition(".")
        inner = with_overrides(getattr(cfg, head), {rest: value}) if dot else value
        cfg = dataclasses.replace(cfg, **{head: inner})
    return cfg


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
    return plain(dataclasses.asdict(cfg))


def trial_from_dict(d: dict[str, Any]) -> TrialConfig:
    """Inverse of `to_dict` for a TrialConfig (e.g. a checkpoint's config.json).

    Unknown keys (another grokstudy version) are dropped; missing ones take their defaults.
    """
    kwargs = {}
    for name, cls in TRIAL_SECTIONS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in dict(d.get(name, {})).items() if k in names}
        if name == "optimizer" and "betas" in values:
            values["betas"] = tuple(values["betas"])
        kwargs[name] = cls(**values)
    return TrialConfig(**kwargs)


# ---- a value's normal forms ------------------------------------------------------------------
# A config value travels as a tuple (in dataclasses) or a list (JSON, YAML, Parquet), as an int or
# a float (128 from YAML, 128.0 from a float column). These two functions are the one place that
# says how each form is written and compared (`points.point_id` hashes the key's JSON text).


def param_text(v: Any) -> str:
    """A value as text, written as a study file writes it: `full` for the full batch (None),
    `[0.9, 0.98]`, `false`, `0.001`, `adamw`. The one text of a value in MLflow params and
    labels; `param_value` reads it back."""
    if v is None:
        return "full"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(param_text(x) for x in v) + "]"
    return str(v)


def param_value(text: str) -> Any:
    """Inverse of `param_text` (lists come back as lists); also reads the Python reprs grokstudy
    0.1 logged (`(0.9, 0.98)`, `None`, `False`). Text that is no number, list or flag stays text."""
    import ast

    if text == "full":
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return list(value) if isinstance(value, tuple) else value


def plain(v: Any) -> Any:
    """`v` for JSON, YAML and Parquet: tuples (at any depth, in dicts too) become lists."""
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def value_key(v: Any) -> Any:
    """A hashable key under which equal values meet, whichever path typed them: sequences (at any
    depth) become tuples. Numbers stay as they are: Python's == and hash already make 128 and
    128.0 one key, and a label keeps the type the study gave."""
    if isinstance(v, (list, tuple)):
        return tuple(value_key(x) for x in v)
    return v
