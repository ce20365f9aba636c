"""torchvision's ResNet topologies, rewritten as the paper does.

Each stage (``layer1`` .. ``layer4``) keeps its first block as torchvision has it
(it changes the shape: stride 2 and/or more channels, with a ReLU after the
addition). The stage's other blocks keep the shape, so they are steps of an ODE:
they form a :class:`ResidualStack` of N residual functions with step 1/N and no
ReLU after the addition, and ``grad=adjoint`` applies inside every stage.

``model.pretrained=<file>`` loads a torchvision state dict (e.g. the
``resnet50-*.pth`` files torchvision downloads) with its key names; nothing is
fetched at run time.
"""
from __future__ import annotations

import logging
import re
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import names
from .compat import require_torchvision
from .errors import ConfigError
from .inits import INITS
from .integrators import INTEGRATORS
from .stack import ResidualStack

log = logging.getLogger("rode")

# arch -> (block type, blocks per stage), as in torchvision.
ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
STEMS = names.STEMS
names.agree(ARCHS, names.ARCHS, "ARCHS")


# ------------------------------------------------------- residual functions
def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBranch(nn.Module):
    """The residual function of a BasicBlock: bn2(conv2(relu(bn1(conv1(x)))))."""

    last_norm = "bn2"

    def __init__(self, planes: int):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        _torchvision_init(self)

    def forward(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class BottleneckBranch(nn.Module):
    """The residual function of a Bottleneck: 1x1 -> 3x3 -> 1x1 convs with BN, ReLU between."""

    last_norm = "bn3"

    def __init__(self, planes: int, inner: int):
        super().__init__()
        self.conv1, self.bn1 = conv1x1(planes, inner), nn.BatchNorm2d(inner)
        self.conv2, self.bn2 = conv3x3(inner, inner), nn.BatchNorm2d(inner)
        self.conv3, self.bn3 = conv1x1(inner, planes), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        _torchvision_init(self)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


def _torchvision_init(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


# ------------------------------------------------------------------ model
class Stage(nn.Module):
    """One of layer1..layer4: the ordinary first block, then the ODE part."""

    def __init__(self, first: nn.Module, stack: ResidualStack):
        super().__init__()
        self.first, self.stack = first, stack

    def forward(self, x):
        return self.stack(self.first(x))


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet with a ResidualStack in every stage (module names as
    torchvision's where they exist: conv1, bn1, layer1..layer4, fc)."""

    def __init__(self, stem: nn.Module, stages: Sequence[Stage], head_features: int,
                 num_classes: int):
        super().__init__()
        self.stem = stem
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head_features, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def stages(self) -> list[Stage]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def stacks(self) -> list[ResidualStack]:
        return [s.stack for s in self.stages()]


def stage_depths(arch: str, depths: Sequence[int] | None) -> list[int]:
    """Number of residual functions N in each stage's stack (blocks - 1 by default)."""
    if depths is not None:
        return [int(d) for d in depths]
    return [b - 1 for b in ARCHS[arch][1]]


def build_resnet(input_shape: Sequence[int], num_classes: int, *, width: int, init: str,
                 method, grad, arch: str, stem: str = "imagenet",
                 depths: Sequence[int] | None = None,
                 weights: str | Path | None = None) -> TorchvisionResNet:
    """``model=resnet`` (arch, stem, depths, weights: the ``model`` node's knobs);
    ``width`` is the base number of planes (64 in torchvision)."""
    # Imported here, not at the top: torchvision takes a second to import, which
    # runs of other models (models.py imports this module) need not pay.
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if len(input_shape) != 3:
        raise ConfigError(f"model=resnet needs image inputs (C, H, W); the dataset gives "
                          f"shape {list(input_shape)}")
    kind = ARCHS[arch][0]
    depths = stage_depths(arch, depths)
    expansion = 4 if kind == "bottleneck" else 1
    if stem == "imagenet":
        stem_layers = nn.Sequential(nn.Conv2d(input_shape[0], width, 7, 2, 3, bias=False),
                                    nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                    nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    else:   # small images: a 3x3 conv, no downsampling before layer1
        stem_layers = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False),
                                    nn.BatchNorm2d(width), nn.ReLU(inplace=True))
    _torchvision_init(stem_layers)

    stages, inplanes = [], width
    for k, n in enumerate(depths):
        planes, stride = width * 2 ** k, 1 if k == 0 else 2
        out = planes * expansion
        downsample = None
        if stride != 1 or inplanes != out:
            downsample = nn.Sequential(conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
        block = BasicBlock if kind == "basic" else Bottleneck
        first = _torchvision_init(block(inplanes, planes, stride, downsample))
        make = (partial(BasicBranch, out) if kind == "basic"
                else partial(BottleneckBranch, out, planes))
        stages.append(Stage(first, ResidualStack(INITS[init](make, n), method, grad)))
        inplanes = out
    model = TorchvisionResNet(stem_layers, stages, inplanes, num_classes)
    if weights:
        load_torchvision_weights(model, weights)
    return model


# --------------------------------------------------------- torchvision weights
_BLOCK_KEY = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")


def torchvision_key(key: str, depths: Sequence[int]) -> str | None:
    """Our name for a torchvision state-dict key (None: no such parameter here)."""
    if key.startswith(("conv1.", "bn1.")):
        return "stem." + {"conv1": "0", "bn1": "1"}[key.split(".")[0]] + key[key.index("."):]
    m = _BLOCK_KEY.match(key)
    if m is None:
        return key   # fc.*
    stage, block, rest = int(m[1]), int(m[2]), m[3]
    if block == 0:
        return f"layer{stage}.first.{rest}"
    if block > depths[stage - 1]:
        return None
    return f"layer{stage}.stack.functions.{block - 1}.{rest}"


def load_torchvision_weights(model: TorchvisionResNet, path: str | Path) -> None:
    """Load a torchvision state dict into ``model`` (the same arch and width).

    torchvision's blocks compute relu(x + f(x)); ours compute x + f(x)/N inside a
    stage. The last BatchNorm of each residual function is scaled by N, so each
    block adds the same f(x) as in torchvision; the only change left is the
    missing ReLU after the addition. A classifier of another size is not loaded
    (the model keeps its fresh ``fc`` for its own number of classes).
    """
    path = Path(str(path)).expanduser()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # not a torch file, truncated, unsafe pickle...
        raise ConfigError(f"model.pretrained={path}: cannot load ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"model.pretrained={path}: not a state dict")

    depths = [len(s.stack.functions) for s in model.stages()]
    ours = model.state_dict()
    mapped, unexpected, wrong_shape = {}, [], []
    for key, value in state.items():
        name = torchvision_key(key.removeprefix("module."), depths)
        if name is None or name not in ours:
            unexpected.append(key)
        elif ours[name].shape != value.shape:
            wrong_shape.append(f"{key} {tuple(value.shape)} vs {tuple(ours[name].shape)}")
        else:
            mapped[name] = value
    fc_skipped = [k for k in wrong_shape if k.startswith("fc.")]
    wrong_shape = [k for k in wrong_shape if not k.startswith("fc.")]
    missing = [k for k in ours if k not in mapped and not (fc_skipped and k.startswith("fc."))]
    if unexpected or wrong_shape or missing:
        detail = "; ".join(part for part in (
            wrong_shape and f"shape mismatch: {', '.join(wrong_shape[:2])}",
            missing and f"missing {len(missing)} keys (e.g. {missing[0]})",
            unexpected and f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})") if part)
        raise ConfigError(f"model.pretrained={path} does not fit this model ({detail}); it must be "
                          f"a torchvision state dict of the same model.arch, with width=64 "
                          f"and model.stem=imagenet")

    for k, stage in enumerate(model.stages()):   # x + f(x) = x + (N f(x)) / N
        n = len(stage.stack.functions)
        for i, branch in enumerate(stage.stack.functions):
            for p in ("weight", "bias"):
                name = f"layer{k + 1}.stack.functions.{i}.{branch.last_norm}.{p}"
                mapped[name] = mapped[name] * n
    model.load_state_dict(mapped, strict=not fc_skipped)
    if fc_skipped:
        log.info("model.pretrained: fc not loaded (%s); it starts fresh", fc_skipped[0])


# ----------------------------------------------------------------- checks
def check_resnet_config(cfg) -> None:
    """The ``model=resnet`` knobs of a task config, checked before anything runs."""
    require_torchvision("model=resnet")
    m = cfg.model
    check_resnet(m.arch, m.get("stem", "imagenet"), m.get("blocks"), m.get("pretrained"),
                 method=cfg.method, init=cfg.init, width=cfg.width,
                 channels=list(cfg.dataset.get("shape", [3]))[0])


def check_resnet(arch, stem, depths, weights, *, method: str, init: str, width: int,
                 channels: int) -> None:
    """ConfigError unless ``model.arch``, ``model.stem``, ``model.blocks`` and
    ``model.pretrained`` make a model for this method (a weights file is loaded into
    the model it is meant for, so that a wrong file is refused before the run)."""
    for key, value, choices in (("model.arch", arch, ARCHS), ("model.stem", stem, STEMS)):
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not a valid choice; choose from "
                              f"{', '.join(choices)}")
    if depths is not None:
        if (isinstance(depths, (str, int)) or len(depths) != 4
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in depths)):
            raise ConfigError(f"model.blocks={_show(depths)} must be null or a list of 4 "
                              f"integers (residual functions per stage), e.g. [8,8,8,8]")
    low = INTEGRATORS[method].min_functions
    counts = stage_depths(arch, depths)
    if min(counts) < low:
        raise ConfigError(
            f"method={method} needs >= {low} residual functions per stage, but "
            f"model.arch={arch} gives {counts} (its blocks minus the first of each stage); "
            f"use a deeper arch or set model.blocks, e.g. model.blocks=[2,2,2,2]")
    if weights:
        path = Path(str(weights)).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.pretrained={path}: no such file (a torchvision state dict "
                              f"saved on this machine; nothing is downloaded)")
        if init == "tied":
            raise ConfigError("model.pretrained with init=tied: torchvision weights differ per "
                              "block, a tied model would keep only one of them; use init=iid")
        if depths is not None and list(depths) != stage_depths(arch, None):
            raise ConfigError(f"model.pretrained needs the arch's own depths "
                              f"{stage_depths(arch, None)}; set model.blocks=null")
        build_resnet((channels, 32, 32), 1000, width=int(width), init="iid", method=method,
                     grad="backprop", arch=arch, stem=stem, weights=weights)


def _show(value) -> str:
    try:
        return str(list(value))
    except TypeError:
        return repr(value)
