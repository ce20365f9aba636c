"""Classifiers built around a ResidualStack, and the ways to initialise its weights."""
from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch
from torch import nn

from .gradmodes import get_grad_mode
from .integrators import get_integrator
from .resnet import build_resnet
from .stack import ResidualStack


# ------------------------------------------------------------ residual functions
class MLPBlock(nn.Sequential):
    """f(x) = W2 σ(W1 x + b1) + b2."""

    def __init__(self, width: int, hidden: int, activation: str = "relu"):
        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[activation]
        super().__init__(nn.Linear(width, hidden), act(), nn.Linear(hidden, width))


class ConvBlock(nn.Sequential):
    """f(x) = BN(conv3x3(ReLU(BN(conv3x3(x))))): the paper's CIFAR residual function."""

    def __init__(self, planes: int):
        super().__init__(
            nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes),
            nn.ReLU(),
            nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes),
        )


# ------------------------------------------------------------------- inits
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
            for p, pa, pb in zip(block.parameters(), a.parameters(), b.parameters()):
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
            for p in _last_layer(block).parameters(recurse=False):
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


# ------------------------------------------------------------------ models
class ResNet(nn.Module):
    """embed -> ResidualStack -> head."""

    def __init__(self, embed: nn.Module, stack: ResidualStack, head: nn.Module):
        super().__init__()
        self.embed, self.stack, self.head = embed, stack, head

    def forward(self, x):
        return self.head(self.stack(self.embed(x)))

    def stacks(self) -> list[ResidualStack]:
        return [m for m in self.modules() if isinstance(m, ResidualStack)]


def build_mlp(input_shape: Sequence[int], num_classes: int, *, depth: int, width: int,
              hidden: int | None, activation: str, init: str, method: str, grad, **_) -> ResNet:
    in_features = math.prod(input_shape)
    hidden = hidden or width
    blocks = INITS[init](lambda: MLPBlock(width, hidden, activation), depth)
    return ResNet(nn.Sequential(nn.Flatten(), nn.Linear(in_features, width)),
                  ResidualStack(blocks, method, grad),
                  nn.Linear(width, num_classes))


def build_conv(input_shape: Sequence[int], num_classes: int, *, depth: int, width: int,
               init: str, method: str, grad, **_) -> ResNet:
    if len(input_shape) != 3:
        raise ValueError(f"model=conv needs image inputs (C, H, W); the dataset gives "
                         f"shape {list(input_shape)}")
    stem = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False),
                         nn.BatchNorm2d(width), nn.ReLU())
    blocks = INITS[init](lambda: ConvBlock(width), depth)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
    return ResNet(stem, ResidualStack(blocks, method, grad), head)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": build_mlp, "conv": build_conv,
                                               "resnet": build_resnet}


def build_model(cfg, input_shape, num_classes) -> nn.Module:
    """The model a run's config describes (cfg: the whole task config)."""
    m = cfg.model
    return MODELS[m.name](
        input_shape, num_classes, depth=int(cfg.depth), width=int(cfg.width),
        hidden=m.get("hidden"), activation=m.get("activation", "relu"),
        init=cfg.init, method=integrator_from_config(cfg), grad=grad_mode_from_config(cfg),
        config=m)


def integrator_from_config(cfg):
    """``method=<name>``; method=momentum takes its momentum factor γ from ``gamma``."""
    if cfg.method == "momentum":
        return get_integrator("momentum", gamma=cfg.get("gamma", 0.9))
    return get_integrator(cfg.method)


def grad_mode_from_config(cfg):
    """``grad=<name>``, with that mode's options from the node of the same name
    (e.g. ``adjoint: {...}``) when the config has one."""
    options = cfg.get(cfg.grad) or {}
    return get_grad_mode(cfg.grad, **options)
