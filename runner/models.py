"""Classifiers built around a ResidualStack, and the model a run's config describes."""
from __future__ import annotations

import math
from typing import Callable, Sequence

from torch import nn

from . import names
from .gradmodes import get_grad_mode
from .inits import INITS
from .integrators import get_integrator
from .resnet import build_resnet
from .stack import ResidualStack, ResNet, set_alpha
from .transformer import build_transformer

# ------------------------------------------------------------ residual functions
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
names.agree(ACTIVATIONS, names.ACTIVATIONS, "ACTIVATIONS")


class MLPBlock(nn.Sequential):
    """f(x) = W2 σ(W1 x + b1) + b2."""

    def __init__(self, width: int, hidden: int, activation: str = "relu"):
        act = ACTIVATIONS[activation]
        super().__init__(nn.Linear(width, hidden), act(), nn.Linear(hidden, width))


class ConvBlock(nn.Sequential):
    """f(x) = BN(conv3x3(ReLU(BN(conv3x3(x))))): the paper's CIFAR residual function."""

    def __init__(self, planes: int):
        super().__init__(
            nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes),
            nn.ReLU(),
            nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes),
        )


# ------------------------------------------------------------------ models
def build_mlp(input_shape: Sequence[int], num_classes: int, *, depth: int, width: int,
              hidden: int | None, activation: str, init: str, method: str, grad) -> ResNet:
    in_features = math.prod(input_shape)
    hidden = hidden or width
    blocks = INITS[init](lambda: MLPBlock(width, hidden, activation), depth)
    return ResNet(nn.Sequential(nn.Flatten(), nn.Linear(in_features, width)),
                  ResidualStack(blocks, method, grad),
                  nn.Linear(width, num_classes))


def build_conv(input_shape: Sequence[int], num_classes: int, *, depth: int, width: int,
               init: str, method: str, grad) -> ResNet:
    if len(input_shape) != 3:
        raise ValueError(f"model=conv needs image inputs (C, H, W); the dataset gives "
                         f"shape {list(input_shape)}")
    stem = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False),
                         nn.BatchNorm2d(width), nn.ReLU())
    blocks = INITS[init](lambda: ConvBlock(width), depth)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
    return ResNet(stem, ResidualStack(blocks, method, grad), head)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": build_mlp, "conv": build_conv,
                                               "resnet": build_resnet,
                                               "transformer": build_transformer}
names.agree(MODELS, names.MODELS, "MODELS")


def build_model(cfg, input_shape, num_classes) -> nn.Module:
    """The model a run's config describes (cfg: the whole task config). Every
    residual stack gets the step N^(-alpha) (``alpha``: default 1, the step 1/N)."""
    model = MODELS[cfg.model.name](
        input_shape, num_classes, width=int(cfg.width), init=cfg.init,
        method=integrator_from_config(cfg), grad=grad_mode_from_config(cfg),
        **model_options(cfg))
    alpha = cfg.get("alpha", 1.0)
    if alpha is not None and float(alpha) != 1.0:
        set_alpha(model, float(alpha))
    return model


def model_options(cfg) -> dict:
    """The builder's own arguments: what of the config only this model uses."""
    m = cfg.model
    if m.name == "resnet":   # one depth per stage, in the model node
        return {"arch": m.arch, "stem": m.get("stem", "imagenet"), "depths": m.get("blocks"),
                "weights": m.get("pretrained")}
    if m.name == "mlp":
        return {"depth": int(cfg.depth), "hidden": m.get("hidden"),
                "activation": m.get("activation", "relu")}
    if m.name == "transformer":
        return {"depth": int(cfg.depth), "block": m.get("block", "parallel"),
                "heads": int(m.get("heads", 4)), "mlp_ratio": float(m.get("mlp_ratio", 2.0)),
                "dropout": float(m.get("dropout", 0.0)), "patch": int(m.get("patch", 2)),
                "sequence": (cfg.get("dataset") or {}).get("name") == "text"}
    return {"depth": int(cfg.depth)}


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
