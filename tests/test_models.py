"""Shapes, pinned parameter counts, decay membership, init scale, and gromov's lookup = one-hot matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grokstudy.config import ModelConfig
from grokstudy.models import MODELS, build_model, decay_groups

# Pinned like flax's CNN_PARAMS: a change here changes every study's model.
REFERENCE_MLP_PARAMS = 193_761  # x+y mod 97: embed 97*128 + (256*512 + 512) + (512*97 + 97)
NANDA_TRANSFORMER_PARAMS = 226_688  # p=113; Nanda's 226,816 also unembeds the "=" token (+128)
GROMOV_PARAMS = 145_500  # p=97, width 500: 194*500 + 500*97


def built(seed: int = 0, **model: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(**model), 11, 11)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_model_maps_operand_pairs_to_float32_logits(kind: str) -> None:
    net = built(kind=kind, embed_dim=16, width=32, heads=2)
    logits = net(torch.randint(0, 11, (5, 2)))
    assert logits.shape == (5, 11)
    assert logits.dtype == torch.float32


def test_parameter_counts_are_pinned() -> None:
    assert count_parameters(build_model(ModelConfig(), 97, 97)) == REFERENCE_MLP_PARAMS
    nanda = ModelConfig(kind="transformer", embed_dim=128, heads=4, width=512, depth=1)
    assert count_parameters(build_model(nanda, 113, 113)) == NANDA_TRANSFORMER_PARAMS
    assert count_parameters(build_model(ModelConfig(kind="gromov", width=500), 97, 97)) == GROMOV_PARAMS


def test_matrices_and_embeddings_decay_but_biases_and_norm_gains_do_not() -> None:
    net = built(kind="transformer", embed_dim=16, width=32, heads=2, layer_norm=True)
    names = {id(p): n for n, p in net.named_parameters()}
    decay, free = decay_groups(net)
    assert sorted(names[id(p)] for p in decay) == [
        "blocks.0.attn.out.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.mlp_in.weight",
        "blocks.0.mlp_out.weight",
        "embed.weight",
        "pos",
        "unembed.weight",
    ]
    assert sorted(names[id(p)] for p in free) == [
        "blocks.0.ln_attn.bias",
        "blocks.0.ln_attn.weight",
        "blocks.0.ln_mlp.bias",
        "blocks.0.ln_mlp.weight",
        "blocks.0.mlp_in.bias",
        "blocks.0.mlp_out.bias",
        "ln_final.bias",
        "ln_final.weight",
    ]
    mlp = build_model(ModelConfig(), 97, 97)
    decay, free = decay_groups(mlp)
    assert (len(decay), sum(p.numel() for p in decay)) == (3, 193_152)
    assert (len(free), sum(p.numel() for p in free)) == (2, 609)


@pytest.mark.parametrize("kind", list(MODELS))
def test_init_scale_multiplies_every_initial_weight(kind: str) -> None:
    base = built(seed=3, kind=kind, embed_dim=16, width=32, heads=2, layer_norm=True)
    scaled = built(seed=3, kind=kind, embed_dim=16, width=32, heads=2, layer_norm=True, init_scale=8.0)
    for a, b in zip(base.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(a * 8.0, b)


def test_embed_std_redraws_the_embeddings_alone_at_that_scale() -> None:
    from grokstudy.config import trial_from_dict, validate_trial
    from grokstudy.errors import StudyError

    kw = dict(kind="transformer", embed_dim=64, width=32, heads=2)
    nanda, grokfast = built(seed=3, **kw), built(seed=3, **kw, embed_std=1.0)
    for (name, a), b in zip(nanda.named_parameters(), grokfast.parameters(), strict=True):
        assert torch.equal(a, b) == (name != "embed.weight"), name
    # Nanda's N(0, 1/d) against torch's N(0, 1): 8x apart at d = 64.
    assert nanda.embed.weight.std().item() == pytest.approx(1 / 8, rel=0.25)
    assert grokfast.embed.weight.std().item() == pytest.approx(1.0, rel=0.25)
    with pytest.raises(StudyError, match="model.kind gromov has no embedding") as err:
        validate_trial(trial_from_dict({"model": {"kind": "gromov", "embed_std": 1.0}}))
    assert "model.embed_std" in str(err.value)


def test_gromov_lookup_equals_the_one_hot_matmul_of_the_paper() -> None:
    net = built(kind="gromov", width=32)
    x = torch.randint(0, 11, (20, 2))
    one_hot = torch.cat([F.one_hot(x[:, 0], 11), F.one_hot(x[:, 1], 11)], dim=1).float()  # (B, 22)
    expected = (one_hot @ net.w_in).square() @ net.w_out.weight.T
    torch.testing.assert_close(net(x), expected)


def test_transformer_attention_is_causal_and_reads_the_last_position() -> None:
    net = built(kind="transformer", embed_dim=16, width=32, heads=2)
    seen: list[torch.Tensor] = []
    hook = net.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(out))
    x = torch.tensor([[1, 2], [1, 3], [4, 2]])
    logits = net(x)
    hook.remove()
    residual = seen[0]  # (B, 3, C): positions a, b, "="
    # Changing b (position 1) leaves position 0 unchanged: no position sees a later one.
    torch.testing.assert_close(residual[0, 0], residual[1, 0])
    assert not torch.allclose(residual[0, 1], residual[1, 1])
    # Changing a (position 0) changes every later position.
    assert not torch.allclose(residual[0, 1], residual[2, 1]) and not torch.allclose(
        residual[0, 2], residual[2, 2]
    )
    # The logits are read at "=", which sees both operands.
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[0], logits[2])


def test_mlp_activation_choice_changes_the_function() -> None:
    relu = built(seed=1, embed_dim=8, width=16, activation="relu")
    quad = built(seed=1, embed_dim=8, width=16, activation="quadratic")
    x = torch.randint(0, 11, (4, 2))
    h = relu.embed(x).flatten(1)
    torch.testing.assert_close(quad(x), quad.unembed(quad.hidden[0](h).square()))
    assert not torch.allclose(relu(x), quad(x))
