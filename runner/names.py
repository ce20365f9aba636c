"""The names of every registry, in one torch-free place.

The schema (``runner.schema``) offers these names as the valid choices of its keys
before torch loads; each registry (``INTEGRATORS``, ``GRAD_MODES``, ``MODELS``, ...)
checks when it is imported that its keys are exactly these (:func:`agree`), so a
name added to a registry and not here (or here and not there) fails at import.
To add an entry: register it in its module and add its name here.
"""
from __future__ import annotations

# runner.integrators.INTEGRATORS: name -> the fewest residual functions it needs
METHODS = {"euler": 1, "heun": 2, "rev_heun": 2, "momentum": 1, "coupled": 2}
# method -> the number of residual functions must be a multiple of this (default 1)
METHOD_MULTIPLES = {"coupled": 2}
GRADS = ("backprop", "adjoint")                     # runner.gradmodes.GRAD_MODES
VJPS = ("exact", "shared")                          # runner.gradmodes.AdjointOptions.vjp
INITS = ("smooth", "iid", "zero", "tied")           # runner.inits.INITS
MODELS = ("mlp", "conv", "resnet", "transformer")                  # runner.models.MODELS; conf/model/*.yaml
IMAGE_MODELS = ("conv", "resnet")                   # models that need (C, H, W) inputs
ACTIVATIONS = ("relu", "tanh", "gelu")              # runner.models.ACTIVATIONS
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")   # runner.resnet.ARCHS
STEMS = ("imagenet", "cifar")                       # runner.resnet.STEMS
# runner.data.DATASETS; conf/dataset/*.yaml (the image ones: runner.vision.SOURCES)
DATASETS = ("digits", "synthetic", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet",
            "text")
IMAGE_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet")
HOOKS = ("grad_error", "memory", "recon", "smoothness")   # runner.hooks.HOOKS
CONTENDERS = ("plain", "backprop", "adjoint", "adjoint_shared", "checkpoint", "torchdiffeq",
              "memcnn")                             # runner.contenders.CONTENDERS
PARAMETRIZATIONS = ("standard", "completep", "depth_mup")   # runner.optim.depth_factors
OPTIMIZERS = ("sgd", "adam")                        # runner.engine.OPTIMIZERS
SCHEDULES = ("constant", "step", "cosine")          # runner.engine.SCHEDULES
MONITORS = ("val_acc", "val_loss", "train_loss", "val_bpc")    # runner.selection.MONITORS
# runner.tracking.BACKENDS: logger -> the module its package provides (found without importing it)
LOGGERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
DEVICES = ("cpu", "cuda", "auto")


def agree(registry, names, what: str) -> None:
    """Raise (at import) unless the keys of ``registry`` are exactly ``names``."""
    mine, listed = set(registry), set(names)
    if mine != listed:
        raise RuntimeError(f"{what}: the registry has {sorted(mine - listed)} that runner/names.py "
                           f"lacks, and runner/names.py has {sorted(listed - mine)} that it lacks; "
                           f"keep the two the same")
