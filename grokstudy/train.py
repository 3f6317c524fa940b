"""The training core: a `TrialConfig` in, `EvalRecord`s out. Torch and core modules only.

    state = init_state(cfg)              # or load_state(cfg, path)
    for record in run(cfg, state):       # state.step == record.step at each yield
        ...                              # save_state(state, path) here resumes bit-for-bit

Reproducibility contract: on one device and thread count, a run is a pure
function of the config. The init draws from `train.seed` (in a forked RNG, so the
caller's global RNG is untouched); minibatch k is drawn from a generator seeded
by (train.seed, k), so there is no RNG stream to carry across a restore; the
split depends on `data.split_seed` only.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grokstudy import measures
from grokstudy.config import TrainConfig, TrialConfig, batch_rows, to_dict, validate_trial
from grokstudy.errors import StudyError
from grokstudy.models import build_model
from grokstudy.optim import LossFn, Optimizer, build_loss, build_optimizer
from grokstudy.records import EvalRecord
from grokstudy.tasks import Dataset, build_dataset

STATE_FORMAT = 1
EVAL_CHUNK = 1 << 16
"""Rows per forward pass at evaluation; tables up to this size take one batched forward."""


@dataclass
class TrainState:
    """Everything a run needs to continue: `save_state` writes it, `load_state` reads it back."""

    cfg: TrialConfig
    model: nn.Module
    optimizer: Optimizer
    """Holds the torch optimizer, Grokfast buffers and, for decay_to=init, the initial weights."""
    data: Dataset
    """On `device`; rebuilt from the config on load (it is a pure function of task/data)."""
    device: torch.device
    step: int = 0
    """Optimizer steps taken."""
    last_eval: int = -1
    """Step of the last yielded record (-1: none yet); `run` never yields a step twice."""
    elapsed_s: float = 0.0
    """Wall-clock seconds spent training, evaluation excluded."""


def resolve_device(name: str) -> torch.device:
    """`train.device`: auto -> cuda when available, else cpu; StudyError for cuda without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StudyError(
            "train.device", "cuda asked for, but this torch build sees no CUDA device; use auto or cpu"
        )
    return torch.device(name)


def eval_steps(train: TrainConfig) -> list[int]:
    """Steps at which `run` evaluates: 0, the 1-2-5 steps below eval_every, every eval_every, max_steps."""
    early, decade = [], 1
    while decade < train.eval_every:
        early += [s for s in (decade, 2 * decade, 5 * decade) if s < train.eval_every]
        decade *= 10
    regular = range(train.eval_every, train.max_steps, train.eval_every)
    return sorted({0, train.max_steps, *(s for s in early if s < train.max_steps), *regular})


def set_matmul_precision(train: TrainConfig) -> None:
    """`train.matmul_precision` for this process (torch's setting is process-wide: a pack's
    members share it, `config.PACK_KEYS`)."""
    torch.set_float32_matmul_precision(train.matmul_precision)


def init_state(cfg: TrialConfig) -> TrainState:
    """A fresh run: split, model initialised from `train.seed`, optimizer, all on `train.device`.

    Raises `StudyError` (every problem, by dotted path) for a config the rules of
    `config.py` do not admit.
    """
    validate_trial(cfg)
    device = resolve_device(cfg.train.device)
    set_matmul_precision(cfg.train)
    data = build_dataset(cfg.task, cfg.data).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, data.n_tokens, data.n_classes)
    model.to(device)
    return TrainState(cfg, model, build_optimizer(cfg.optimizer, model), data, device)


def run(cfg: TrialConfig, state: TrainState | None = None) -> Iterator[EvalRecord]:
    """Train from `state` (default: `init_state(cfg)`) to `train.max_steps`, yielding a record
    at each step of `eval_steps`.

    Mutates `state`; at each yield `state.step == record.step`, so the caller may
    save it there. Steps already yielded (`state.last_eval`) are not yielded again.
    Entry points call `configure_process()` once before training.
    """
    state = init_state(cfg) if state is None else state
    loss_fn = build_loss(cfg.train.loss)
    batch = _batches(cfg.train, state.data, state.device)
    state.model.train()
    for target in (s for s in eval_steps(cfg.train) if s > state.last_eval):
        _advance(state, target, batch, loss_fn)
        record = evaluate(cfg, state, loss_fn)
        state.last_eval = state.step
        yield record


def _advance(state: TrainState, target: int, batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
             loss_fn: LossFn) -> None:  # fmt: skip
    """Optimizer steps up to `target`, on the training clock."""
    if state.step >= target:
        return
    model, optimizer = state.model, state.optimizer
    with training_clock(state):
        while state.step < target:
            x, y = batch(state.step)
            loss = loss_fn(model(x), y)  # float32 logits, float64 loss
            loss.backward()
            optimizer.step(state.step)
            optimizer.zero_grad()
            state.step += 1


def seconds_per_step(cfg: TrialConfig, steps: int, warmup: int = 2) -> float:
    """Wall-clock seconds of one training step of a fresh `cfg` run, over `steps` steps after
    `warmup` untimed ones (`packsize`: what a pack of one costs)."""
    state = init_state(cfg)
    loss_fn = build_loss(cfg.train.loss)
    batch = _batches(cfg.train, state.data, state.device)
    state.model.train()
    _advance(state, warmup, batch, loss_fn)
    state.elapsed_s = 0.0
    _advance(state, warmup + steps, batch, loss_fn)
    return state.elapsed_s / steps


@torch.no_grad()
def evaluate(cfg: TrialConfig, state: TrainState, loss_fn: LossFn) -> EvalRecord:
    """Loss and accuracy on the full train and validation sets plus the weight measures; one host sync."""
    model, data = state.model, state.data
    train_loss, train_acc = _loss_and_accuracy(model, data.train_x, data.train_y, loss_fn)
    val_loss, val_acc = _loss_and_accuracy(model, data.val_x, data.val_y, loss_fn)
    norm = measures.weights_norm_tensor(model)
    fourier = measures.fourier_top_k_share_tensor(model, cfg.task)
    gini = measures.fourier_gini_tensor(model, cfg.task)
    values = [train_loss, train_acc, val_loss, val_acc, norm, fourier, gini, *_progress(cfg, state)]
    return EvalRecord(state.step, *torch.stack(values).tolist(), elapsed_s=state.elapsed_s)


def measures_due(train: TrainConfig, step: int) -> bool:
    """Does the evaluation at `step` take the progress measures? Every `measures_every`-th
    evaluation (counting the one at step 0) and the one at max_steps."""
    return step in _measured_steps(train)


@functools.cache
def _measured_steps(train: TrainConfig) -> frozenset[int]:
    if train.measures_every == 0:
        return frozenset()
    steps = eval_steps(train)
    return frozenset(steps[:: train.measures_every]) | {train.max_steps}


def _progress(cfg: TrialConfig, state: TrainState) -> list[torch.Tensor]:
    """`measures.model_progress_tensor` of the lone model (three NaNs where no group or not due)."""
    due = measures_due(cfg.train, state.step)
    values = measures.model_progress_tensor(state.model, cfg.task, state.data, EVAL_CHUNK) if due else None
    if values is None:
        return [torch.tensor(float("nan"), dtype=torch.float64, device=state.device)] * 3
    return list(values)


def save_state(state: TrainState, path: str | Path) -> None:
    """One `torch.save` file of the full state, plus `config.json` beside it (`config.to_dict`)."""
    path = Path(path)
    payload = {
        "format": STATE_FORMAT,
        "step": state.step,
        "last_eval": state.last_eval,
        "elapsed_s": state.elapsed_s,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
    }
    torch.save(payload, path)
    (path.parent / "config.json").write_text(json.dumps(to_dict(state.cfg), indent=2) + "\n")


def load_state(cfg: TrialConfig, path: str | Path) -> TrainState:
    """The state `save_state` wrote, on this config's device; `run` continues it bit-for-bit."""
    state = init_state(cfg)
    payload = torch.load(Path(path), map_location=state.device, weights_only=True)
    if payload.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: unknown training-state format {payload.get('format')!r}")
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.step = int(payload["step"])
    state.last_eval = int(payload["last_eval"])
    state.elapsed_s = float(payload["elapsed_s"])
    return state


# ---- the process ---------------------------------------------------------------------------


def configure_process() -> None:
    """Process-wide settings that make small-model CPU training fast; idempotent.

    Called by the entry points (`grokstudy train`, each Ray trial, the benchmarks),
    never by the training functions, which stay free of process-wide side effects.

    1. Flush denormal floats to zero. Large weight decay drives weights toward 0,
       into denormals that CPU kernels handle an order of magnitude slower;
       flushing changes no accuracy or phase.
    2. Keep freed memory in glibc's heap. By default blocks over ~128 KiB-32 MiB
       go back to the OS when freed, so each step's activations page-fault afresh.
       The price is that the process keeps its peak heap until it exits.
    (What each is worth: bench/README.md.)
    """
    torch.set_flush_denormal(True)
    if sys.platform.startswith("linux"):
        _tune_malloc()


@functools.cache
def _tune_malloc() -> None:
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum on 64-bit
    mallopt(m_trim_threshold, 1 << 30)


def _batches(
    train: TrainConfig, data: Dataset, device: torch.device
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """step -> (x, y): the full training set, or the step's `minibatch` of it."""
    n = data.train_x.shape[0]
    if full_batch(train, n):
        return lambda step: (data.train_x, data.train_y)
    generator = torch.Generator(device=device)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = minibatch(train, n, step, generator)
        return data.train_x[idx], data.train_y[idx]

    return batch


def full_batch(train: TrainConfig, n: int) -> bool:
    """Does every step train on all n training pairs (`config.batch_rows`)?"""
    return batch_rows(train, n) >= n


def minibatch(train: TrainConfig, n: int, step: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of the training set in step's minibatch: `batch_rows` distinct ones, drawn from a
    generator seeded by (train.seed, step) alone, so a restore needs no RNG state."""
    generator.manual_seed(((train.seed << 32) + step) % 2**64)
    return torch.randperm(n, generator=generator, device=generator.device)[: batch_rows(train, n)]


@contextlib.contextmanager
def training_clock(state: Any) -> Iterator[None]:
    """Add the wall-clock time of the block's training steps to `state.elapsed_s` (a `TrainState`
    or a pack's), waiting for a GPU's queued steps first."""
    start = time.perf_counter()
    yield
    if state.device.type == "cuda":
        torch.cuda.synchronize(state.device)  # so the clock sees the queued steps
    state.elapsed_s += time.perf_counter() - start


def _loss_and_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and accuracy as 0-d float64 tensors, one forward per EVAL_CHUNK rows."""
    loss_sum = x.new_zeros((), dtype=torch.float64)
    correct = x.new_zeros((), dtype=torch.float64)
    for i in range(0, x.shape[0], EVAL_CHUNK):
        xb, yb = x[i : i + EVAL_CHUNK], y[i : i + EVAL_CHUNK]
        logits = model(xb)  # (B, n_classes)
        loss_sum += loss_fn(logits, yb) * yb.shape[0]
        correct += (logits.argmax(-1) == yb).sum()
    return loss_sum / x.shape[0], correct / x.shape[0]
