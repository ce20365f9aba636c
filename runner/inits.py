"""Ways to initialise the residual functions of a stack: each takes ``make`` (a
fresh residual function per call) and a depth N, and returns the N functions."""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from . import names


def _last_layer(block: nn.Module) -> nn.Module:
    layers = [m for m in block.modules() if any(True for _ in m.parameters(recurse=False))]
    return layers[-1]


def init_iid(make: Callable[[], nn.Module], depth: int) -> list[nn.Module]:
    """Each layer drawn independently: NOT smooth in depth, whatever N."""
    return [make() for _ in range(depth)]


def init_smooth(make: Callable[[], nn.Module], depth: int) -> list[nn.Module]:
    """θ_n = θ(n/N) on the path θ(t) = cos(πt/2) θ_A + sin(πt/2) θ_B between two
    independent random draws: increments are O(1/N) and the per-weight variance
    stays that of a fresh draw (cos² + sin² = 1)."""
    a, b = make(), make()
    blocks = []
    for n in range(depth):
        t = n / depth
        block = copy.deepcopy(a)
        ca, cb = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
        with torch.no_grad():
            for p, pa, pb in zip(block.parameters(), a.parameters(), b.parameters(), strict=True):
                if torch.equal(pa, pb):
                    continue   # e.g. BatchNorm's γ=1, β=0: constant, already smooth
                p.copy_(ca * pa + cb * pb)
        blocks.append(block)
    return blocks


def init_zero(make: Callable[[], nn.Module], depth: int) -> list[nn.Module]:
    """Each residual function's last layer zeroed: the network starts as the identity."""
    blocks = init_iid(make, depth)
    with torch.no_grad():
        for block in blocks:
            # A function that sums branches (a parallel transformer block) names each
            # branch's last layer; otherwise the last layer with parameters.
            last = getattr(block, "last_layers", None)
            for layer in (last() if last is not None else [_last_layer(block)]):
                for p in layer.parameters(recurse=False):
                    p.zero_()
    return blocks


def init_tied(make: Callable[[], nn.Module], depth: int) -> list[nn.Module]:
    """One set of weights shared by every layer: constant in depth, the smoothest case.

    Without buffers the same module is simply repeated. A function with buffers
    (BatchNorm running statistics) gets one module per layer that shares the
    parameters but keeps its own buffers: each layer sees activations of its own
    scale, and one running average over all layers would be wrong for every one
    of them in eval mode."""
    block = make()
    if not any(True for _ in block.buffers()):
        return [block] * depth
    shared = {id(p): p for p in block.parameters()}   # deepcopy's memo: keep these as they are
    return [block] + [copy.deepcopy(block, dict(shared)) for _ in range(depth - 1)]


INITS: dict[str, Callable[[Callable[[], nn.Module], int], list[nn.Module]]] = {
    "smooth": init_smooth, "iid": init_iid, "zero": init_zero, "tied": init_tied,
}
names.agree(INITS, names.INITS, "INITS")
