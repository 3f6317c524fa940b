"""Small models for algorithmic tables, built from a `ModelConfig`.

Every model maps a LongTensor [B, 2] of operand indices to float32 logits
[B, n_classes]. Which tensors weight decay touches is *the* grokking knob, so it
is one named, tested function: `decay_groups`.

A new model is one `nn.Module` class (constructor `(ModelConfig, n_tokens,
n_classes)`) plus an entry in `MODELS`.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from grokstudy.config import ModelConfig

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "quadratic": torch.square,  # Gromov 2023's x^2
}


class MLP(nn.Module):
    """Shared operand embedding, concatenated, `depth` hidden layers, unembedding; or, with
    `inputs: onehot`, one-hot(a) ‖ one-hot(b) straight into the first hidden layer (Prieto et
    al. 2025's MLP), computed as two row lookups of its weight as in `Gromov`."""

    def __init__(self, model: ModelConfig, n_tokens: int, n_classes: int) -> None:
        super().__init__()
        self.act = ACTIVATIONS[model.activation]
        self.n_tokens = n_tokens
        self.onehot = model.inputs == "onehot"
        self.embed = None if self.onehot else nn.Embedding(n_tokens, model.embed_dim)
        widths = [2 * n_tokens if self.onehot else 2 * model.embed_dim] + [model.width] * model.depth
        self.hidden = nn.ModuleList(nn.Linear(a, b, bias=model.bias) for a, b in itertools.pairwise(widths))
        self.unembed = nn.Linear(widths[-1], n_classes, bias=model.bias)
        self.register_buffer("offset", torch.tensor([0, n_tokens]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = iter(self.hidden)
        if self.onehot:
            first = next(layers)
            h = F.embedding(x + self.offset, first.weight.t()).sum(1)  # (B, 2, width) -> (B, width)
            h = self.act(h if first.bias is None else h + first.bias)
        else:
            h = self.embed(x).flatten(1)  # (B, 2) -> (B, 2, E) -> (B, 2E): [emb(a), emb(b)]
        for layer in layers:
            h = self.act(layer(h))  # (B, width)
        return self.unembed(h)  # (B, n_classes)

    def operand_embeddings(self) -> list[torch.Tensor]:
        """[n_tokens, E] per operand (one shared table, or the first layer's halves), for the
        Fourier measure."""
        if self.onehot:
            w = self.hidden[0].weight.t()  # (2n, width)
            return [w[: self.n_tokens], w[self.n_tokens :]]
        return [self.embed.weight]


class Attention(nn.Module):
    """Causal multi-head self-attention without biases (as in Nanda et al. 2023)."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (
            t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v)
        )  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.out(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class Block(nn.Module):
    """Residual attention then residual MLP; pre-LN only when asked."""

    def __init__(self, model: ModelConfig) -> None:
        super().__init__()
        d = model.embed_dim
        self.act = ACTIVATIONS[model.activation]
        self.ln_attn = nn.LayerNorm(d) if model.layer_norm else nn.Identity()
        self.attn = Attention(d, model.heads)
        self.ln_mlp = nn.LayerNorm(d) if model.layer_norm else nn.Identity()
        self.mlp_in = nn.Linear(d, model.width, bias=model.bias)
        self.mlp_out = nn.Linear(model.width, d, bias=model.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))  # (B, T, C)
        return x + self.mlp_out(self.act(self.mlp_in(self.ln_mlp(x))))  # (B, T, C)


class Transformer(nn.Module):
    """Decoder-only transformer reading `[a, b, =]`, close to Nanda et al. 2023 (arXiv 2301.05217).

    Nanda's model: d_model 128, 4 heads, d_mlp 512, one block, ReLU, learned
    positions, no LayerNorm, untied unembedding read at the last position.
    """

    def __init__(self, model: ModelConfig, n_tokens: int, n_classes: int) -> None:
        super().__init__()
        d = model.embed_dim
        self.eq_token = n_tokens  # the extra "=" token
        self.embed = nn.Embedding(n_tokens + 1, d)
        self.pos = nn.Parameter(torch.empty(3, d))
        self.blocks = nn.ModuleList(Block(model) for _ in range(model.depth))
        self.ln_final = nn.LayerNorm(d) if model.layer_norm else nn.Identity()
        self.unembed = nn.Linear(d, n_classes, bias=False)
        # Nanda's init: N(0, 1/d_model) for every matrix, N(0, 1/d_vocab) for the unembedding, zero biases.
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("unembed"):
                    p.normal_(0.0, 1.0 / math.sqrt(n_classes))
                elif p.dim() >= 2:
                    p.normal_(0.0, 1.0 / math.sqrt(d))
                elif "ln_" not in name:
                    p.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eq = torch.full_like(x[:, :1], self.eq_token)  # (B, 1)
        h = self.embed(torch.cat([x, eq], dim=1)) + self.pos  # (B, 3, C)
        for block in self.blocks:
            h = block(h)
        return self.unembed(self.ln_final(h[:, -1]))  # (B, n_classes), read at "="

    def operand_embeddings(self) -> list[torch.Tensor]:
        return [self.embed.weight[: self.eq_token]]


class Gromov(nn.Module):
    """one-hot(a) ‖ one-hot(b) -> Linear(2n, width, no bias) -> x^2 -> Linear(width, n_classes, no bias).

    Gromov 2023 ("Grokking modular arithmetic", arXiv 2301.02679). The one-hot
    matmul is done as two row lookups of the first layer's weight: identical
    maths, O(B * width) instead of O(B * n * width).
    """

    fourier_per_column = True
    """Each hidden neuron is one group for the Fourier measure (see measures.py)."""

    def __init__(self, model: ModelConfig, n_tokens: int, n_classes: int) -> None:
        super().__init__()
        self.n_tokens = n_tokens
        self.w_in = nn.Parameter(torch.empty(2 * n_tokens, model.width))  # Linear(2n, width).weight.T
        self.w_out = nn.Linear(model.width, n_classes, bias=False)
        self.register_buffer("offset", torch.tensor([0, n_tokens]), persistent=False)
        # Doshi et al.'s init (d-doshi/Grokking utils/models.py): std 0.5 / (2 * width)^(1/3).
        std = 0.5 / (2 * model.width) ** (1 / 3)
        with torch.no_grad():
            self.w_in.normal_(0.0, std)
            self.w_out.weight.normal_(0.0, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x + self.offset  # (B, 2): b indexes the second half of w_in
        h = F.embedding(rows, self.w_in).sum(1)  # (B, 2, width) -> (B, width)
        return self.w_out(h.square())  # (B, n_classes)

    def operand_embeddings(self) -> list[torch.Tensor]:
        return [self.w_in[: self.n_tokens], self.w_in[self.n_tokens :]]


MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "transformer": Transformer,
    "gromov": Gromov,
}


def build_model(model: ModelConfig, n_tokens: int, n_classes: int) -> nn.Module:
    """A freshly initialised model (uses the global torch RNG), its token embeddings redrawn at
    `embed_std` when set, then every weight times `init_scale`."""
    net = MODELS[model.kind](model, n_tokens, n_classes)
    if model.embed_std is not None:  # drawn last: every other weight is as without it
        with torch.no_grad():
            net.embed.weight.normal_(0.0, model.embed_std)
    if model.init_scale != 1.0:
        # Omnigrok's alpha (Liu et al. 2023): scale every initial weight, LayerNorm gains included.
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(model.init_scale)
    return net


def decay_groups(model: nn.Module, everything: bool = False) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed): matrices and embeddings (dim >= 2) decay; biases and norm gains (dim < 2) don't.

    The rule of nanoGPT's `configure_optimizers`. Nanda et al. 2023 decay every
    tensor, biases included: `everything=True` (`optimizer.decay_biases`) does that.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if everything:
        return params, []
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
