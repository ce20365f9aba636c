"""Transformers as residual networks: pre-LayerNorm blocks as the residual functions
of a :class:`ResidualStack`, on tokens of shape (batch, tokens, width).

Two block forms (``model.block``):

- ``parallel``: one function per layer, f(x) = attn(LN₁ x) + mlp(LN₂ x): one ODE
  step per layer;
- ``sequential``: attention and MLP as two consecutive functions, each a full step
  of size 1/depth: the Lie-Trotter splitting of dx/dt = attn(x) + mlp(x), 2·depth
  functions.

The data decide the embedding and head: images (C, H, W) become patches (a ViT,
mean-pooled head), vectors (D,) become D/patch tokens, and integer token sequences
(``dataset=text``) a causal character language model whose logits have shape
(batch, vocabulary, tokens), which ``F.cross_entropy`` takes as it is.

Dropout is an ``nn.Dropout`` module (residual dropout) and the attention's own
dropout (``scaled_dot_product_attention(dropout_p=...)``, whose probability is that
of an ``nn.Dropout`` module, so the stack sees it and replays the random state of
every call in the adjoint's recomputation).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .inits import INITS
from .stack import ResidualStack, ResNet

BLOCKS = ("parallel", "sequential")


class Attention(nn.Module):
    """f(x) = drop(W_o · softmax(Q Kᵀ / √d) V), Q, K, V = W_qkv LN(x); multi-head."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0, causal: bool = False,
                 norm: bool = True):
        super().__init__()
        if width % heads:
            raise ValueError(f"model.heads={heads} must divide width={width}")
        self.heads, self.causal = heads, causal
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attn_drop = nn.Dropout(dropout)    # its p and training state drive sdpa's dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        shape = x.shape                       # (..., T, D)
        t, d = shape[-2], shape[-1]
        q, k, v = self.qkv(self.norm(x)).reshape(-1, t, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        p = self.attn_drop.p if self.attn_drop.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        return self.drop(self.proj(out.transpose(1, 2).reshape(shape)))


class MLP(nn.Sequential):
    """f(x) = drop(W₂ GELU(W₁ LN(x)))."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(),
                         nn.Linear(hidden, width), nn.Dropout(dropout))


class ParallelBlock(nn.Module):
    """f(x) = attn(LN₁ x) + mlp(LN₂ x): one function per layer (GPT-J / PaLM form)."""

    def __init__(self, width: int, heads: int, hidden: int, dropout: float, causal: bool):
        super().__init__()
        self.attn = Attention(width, heads, dropout, causal)
        self.mlp = MLP(width, hidden, dropout)

    def forward(self, x):
        return self.attn(x) + self.mlp(x)

    def last_layers(self) -> list[nn.Module]:
        """What ``init=zero`` zeroes: both branches' output layers."""
        return [self.attn.proj, self.mlp[3]]


def transformer_functions(*, depth: int, width: int, heads: int, mlp_ratio: float,
                          dropout: float, causal: bool, block: str, init: str) -> list[nn.Module]:
    """The residual functions: ``depth`` parallel blocks, or 2·``depth`` functions
    (attention, MLP, attention, ...) for the sequential form; ``init`` as for any stack."""
    hidden = max(1, int(round(mlp_ratio * width)))
    if block == "parallel":
        return INITS[init](lambda: ParallelBlock(width, heads, hidden, dropout, causal), depth)
    if block != "sequential":
        raise ValueError(f"model.block={block!r}; choose from {', '.join(BLOCKS)}")
    attn = INITS[init](lambda: Attention(width, heads, dropout, causal), depth)
    mlp = INITS[init](lambda: MLP(width, hidden, dropout), depth)
    return [f for pair in zip(attn, mlp, strict=True) for f in pair]


class Patches(nn.Module):
    """(B, C, H, W) -> (B, HW/p², D) by a stride-p convolution, or (B, D₀) -> (B, D₀/p, D)."""

    def __init__(self, input_shape: Sequence[int], width: int, patch: int):
        super().__init__()
        self.image = len(input_shape) == 3
        if self.image:
            c, h, w = input_shape
            if h % patch or w % patch:
                raise ValueError(f"model.patch={patch} must divide the image size {h}x{w}")
            self.proj = nn.Conv2d(c, width, patch, stride=patch)
            tokens = (h // patch) * (w // patch)
        else:
            (dim,) = input_shape
            if dim % patch:
                raise ValueError(f"model.patch={patch} must divide the input size {dim}")
            self.patch = patch
            self.proj = nn.Linear(patch, width)
            tokens = dim // patch
        self.pos = nn.Parameter(torch.randn(tokens, width) * 0.02)

    def forward(self, x):
        if self.image:
            z = self.proj(x).flatten(2).transpose(1, 2)
        else:
            z = self.proj(x.reshape(len(x), -1, self.patch))
        return z + self.pos


class Tokens(nn.Module):
    """(B, T) integer tokens -> (B, T, D): a learned embedding plus positions."""

    def __init__(self, vocab: int, context: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.02)

    def forward(self, x):
        return self.embed(x) + self.pos[: x.shape[-1]]


class PooledHead(nn.Sequential):
    """LN, mean over tokens, linear: a classifier on (B, T, D)."""

    def __init__(self, width: int, num_classes: int):
        super().__init__(nn.LayerNorm(width), nn.Linear(width, num_classes))

    def forward(self, x):
        return self[1](self[0](x).mean(-2))


class LMHead(nn.Sequential):
    """LN, linear to the vocabulary; logits as (B, V, T), cross_entropy's layout."""

    def __init__(self, width: int, vocab: int):
        super().__init__(nn.LayerNorm(width), nn.Linear(width, vocab))

    def forward(self, x):
        return super().forward(x).transpose(1, 2)


def build_transformer(input_shape: Sequence[int], num_classes: int, *, depth: int, width: int,
                      init: str, method, grad, block: str = "parallel", heads: int = 4,
                      mlp_ratio: float = 2.0, dropout: float = 0.0, patch: int = 2,
                      sequence: bool = False):
    """A ViT (images or vectors) or, with ``sequence`` (token inputs, a target per
    position), a causal character language model."""

    if sequence:
        (context,) = input_shape
        embed: nn.Module = Tokens(num_classes, context, width)
        head: nn.Module = LMHead(width, num_classes)
    else:
        embed, head = Patches(input_shape, width, patch), PooledHead(width, num_classes)
    functions = transformer_functions(depth=depth, width=width, heads=heads,
                                      mlp_ratio=mlp_ratio, dropout=dropout, causal=sequence,
                                      block=block, init=init)
    # Sequential: attention and MLP each take a full step 1/depth (Lie-Trotter).
    stack = ResidualStack(functions, method, grad, step_size=1.0 / depth)
    return ResNet(embed, stack, head)


def bits(nats: float) -> float:
    """A loss in nats per token -> bits per token (per character)."""
    return nats / math.log(2)
