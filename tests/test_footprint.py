"""The memory estimate a study is refused by: its parameter count is torch's, exactly."""

from __future__ import annotations

import pytest

from grokstudy import footprint, train
from grokstudy.config import ModelConfig, TaskConfig, TrialConfig, with_overrides
from grokstudy.models import build_model

MODELS = [
    ModelConfig(kind="mlp", embed_dim=16, width=32, depth=1),
    ModelConfig(kind="mlp", embed_dim=8, width=24, depth=3),
    ModelConfig(kind="transformer", embed_dim=32, width=64, depth=1, heads=4),
    ModelConfig(kind="transformer", embed_dim=16, width=48, depth=2, heads=2, layer_norm=True),
    ModelConfig(kind="gromov", width=40),
    ModelConfig(kind="mlp", width=24, depth=2, bias=False, inputs="onehot"),
    ModelConfig(kind="transformer", embed_dim=16, width=48, depth=2, heads=2, bias=False),
]


@pytest.mark.parametrize(
    "model", MODELS, ids=lambda m: f"{m.kind}-d{m.depth}-ln{int(m.layer_norm)}-b{int(m.bias)}-{m.inputs}"
)
@pytest.mark.parametrize("task", [TaskConfig(op="x+y", p=13), TaskConfig(op="perm", n=4)], ids=["p13", "S4"])
def test_the_parameter_count_is_torchs(model: ModelConfig, task: TaskConfig) -> None:
    vocab = footprint.vocabulary(task)
    net = build_model(model, vocab, vocab)
    assert footprint.parameters(model, vocab) == sum(p.numel() for p in net.parameters())


def test_the_estimate_covers_the_trials_own_tensors_and_grows_with_what_it_holds() -> None:
    cfg = TrialConfig()
    state = train.init_state(cfg)
    held = sum(t.numel() * t.element_size() for t in state.model.parameters()) * 4  # + grads, 2 moments
    assert footprint.trial_bytes(cfg) >= held
    wider = with_overrides(cfg, {"model.width": 4 * cfg.model.width})
    ma = with_overrides(cfg, {"optimizer.grokfast": "ma"})
    assert footprint.trial_bytes(wider) > footprint.trial_bytes(cfg)
    params = footprint.parameters(cfg.model, cfg.task.p)  # Grokfast-MA keeps a window of gradients
    assert (
        footprint.trial_bytes(ma) - footprint.trial_bytes(cfg) == params * 4 * cfg.optimizer.grokfast_window
    )
    assert footprint.EVAL_ROWS == train.EVAL_CHUNK


def test_a_pack_needs_its_members_state_but_shares_the_table_and_the_evaluation_chunk() -> None:
    cfg = TrialConfig()
    one, sixty_four = footprint.trial_bytes(cfg), footprint.trial_bytes(cfg, pack=64)
    params = footprint.parameters(cfg.model, cfg.task.p)
    assert sixty_four >= 64 * params * 4 * 4  # weights, gradients and Adam's two moments each
    assert one < sixty_four < 64 * one  # one table, and evaluation chunked across members
