"""How much memory a trial needs, estimated from its config alone (no torch, so the driver can
refuse a study that could never run before anything starts).

An estimate, not a measurement: parameters (counted exactly: tests/test_footprint.py holds the
count to torch's for every model kind), their gradients and optimizer slots in float32, the
dataset, and the activations of one training batch and one evaluation chunk with their
float64 loss. It errs high by design; it exists to refuse the impossible (a first layer of
16 GiB), not to pack a node tightly.
"""

from __future__ import annotations

import math
import os

from grokstudy.config import ModelConfig, TaskConfig, TrialConfig, batch_rows

FLOAT32, FLOAT64, INT64 = 4, 8, 8
OPTIMIZER_SLOTS = {"adamw": 2, "adam": 2, "rmsprop": 1, "sgd": 1}
"""Tensors of parameter size each optimizer keeps (Adam's two moments; SGD's momentum)."""
EVAL_ROWS = 2**16
"""Rows one evaluation pass holds at once (at most; packed.EVAL_CHUNK is smaller)."""
GIB = 2**30


def vocabulary(task: TaskConfig) -> int:
    """Operand tokens and result classes of a task: p for Z_p, n! for the symmetric group S_n."""
    return math.factorial(task.n) if task.op == "perm" else task.p


def parameters(model: ModelConfig, vocab: int) -> int:
    """Trainable parameters of `models.build_model(model, vocab, vocab)`, counted exactly."""
    e, w, depth, b = model.embed_dim, model.width, model.depth, int(model.bias)
    if model.kind == "mlp":
        onehot = model.inputs == "onehot"
        widths = [2 * vocab if onehot else 2 * e] + [w] * depth
        hidden = sum(i * o + b * o for i, o in zip(widths, widths[1:], strict=False))
        return (0 if onehot else vocab * e) + hidden + widths[-1] * vocab + b * vocab
    if model.kind == "transformer":
        norm = 2 * e if model.layer_norm else 0
        block = 2 * norm + 3 * e * e + e * e + (e * w + b * w) + (w * e + b * e)
        return (vocab + 1) * e + 3 * e + depth * block + norm + e * vocab
    if model.kind == "gromov":
        return 2 * vocab * w + w * vocab
    raise ValueError(f"no footprint for model kind {model.kind!r}")


def _activations_per_row(model: ModelConfig, vocab: int) -> int:
    """float32 values one input row keeps for the backward pass (generously)."""
    e, w, depth = model.embed_dim, model.width, model.depth
    if model.kind == "mlp":
        per_row = (2 * vocab if model.inputs == "onehot" else 2 * e) + 2 * w * depth
    elif model.kind == "transformer":
        per_row = 3 * depth * (8 * e + 2 * w) + 3 * e
    else:
        per_row = 4 * w
    return per_row + 2 * vocab  # logits and their gradient


def trial_bytes(cfg: TrialConfig, pack: int = 1) -> int:
    """Estimated peak memory of one trial, or of a pack of `pack` such trials trained as one
    stacked model (packed.py: one table shared, a mask per member, evaluation chunked across
    members), in bytes."""
    vocab = vocabulary(cfg.task)
    params = parameters(cfg.model, vocab)
    slots = 2 + OPTIMIZER_SLOTS.get(cfg.optimizer.name, 2)  # weights, gradients, optimizer state
    grokfast = {"none": 0, "ema": 1, "ma": cfg.optimizer.grokfast_window}[cfg.optimizer.grokfast]
    state = pack * params * FLOAT32 * (slots + grokfast)
    pairs = vocab * vocab
    data = pairs * (2 * INT64 + INT64) + (pack * pairs if pack > 1 else 0)  # + a bool mask each
    train_rows = pack * batch_rows(cfg.train, math.ceil(pairs * cfg.data.fraction))
    per_row = _activations_per_row(cfg.model, vocab) * FLOAT32 + 2 * vocab * FLOAT64  # float64 loss
    activations = max(train_rows, min(pack * pairs, EVAL_ROWS)) * per_row
    return state + data + activations


def describe(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= GIB / 10 else f"{n_bytes / 2**20:.0f} MiB"


def machine_bytes() -> int:
    """This machine's physical memory (0 where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def is_out_of_memory(err: BaseException) -> bool:
    """torch's CUDA OutOfMemoryError, its CPU allocator's failure, or Python's MemoryError."""
    text = str(err)
    return isinstance(err, MemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
    )
