"""The typed schema of every task's config, and the one checker that applies it.

Each key of each task has a spec here (its type, range or choices); the checker
walks a composed config against its task's schema and turns the first bad value
into one line (ConfigError, exit code 2). A new key needs a line in the schema,
not a hand-written check. Rules that tie several keys together live in
``runner.config``. This module does not import torch, so a bad command line is
refused before torch would load.

The choices of registry-backed keys (methods, grad modes, inits, models,
datasets, hooks, contenders, ...) come from ``runner.names``, the one list of each
registry's names, which each registry checks its own keys against at import.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, replace

from omegaconf import OmegaConf

from . import names
from .errors import ConfigError

MAX_DEPTH = 100_000
MAX_SEED = 2**32 - 1          # numpy's seeds are 32-bit
MAX_WIDTH = 65_536

# Registry names: one list each, in runner.names (each registry checks its keys against it).
ACTIVATIONS, ARCHS, CONTENDERS, DATASETS, DEVICES = (names.ACTIVATIONS, names.ARCHS, names.CONTENDERS,
                                                     names.DATASETS, names.DEVICES)
GRADS, HOOKS, IMAGE_MODELS, INITS, METHODS = (names.GRADS, names.HOOKS, names.IMAGE_MODELS, names.INITS,
                                              names.METHODS)
MODELS, MONITORS, OPTIMIZERS, SCHEDULES, STEMS, VJPS = (names.MODELS, names.MONITORS, names.OPTIMIZERS,
                                                        names.SCHEDULES, names.STEMS, names.VJPS)
PARAMETRIZATIONS = names.PARAMETRIZATIONS
METHOD_MULTIPLES = names.METHOD_MULTIPLES


# ------------------------------------------------------------------ specs
def _range(low, high, open_low: bool = False, open_high: bool = False) -> str:
    lo, hi = ("(" if open_low else "["), (")" if open_high else "]")
    if low is not None and high is not None:
        return f" in {lo}{low}, {high}{hi}"
    if low is not None:
        return f" {'>' if open_low else '>='} {low}"
    if high is not None:
        return f" {'<' if open_high else '<='} {high}"
    return ""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Spec:
    """One key's type. ``null``: None is allowed; ``required``: the key must be there."""

    null: bool = field(default=False, kw_only=True)
    required: bool = field(default=True, kw_only=True)
    why: str = field(default="", kw_only=True)   # appended to the message

    def check(self, key: str, value):
        if value is None:
            if self.null:
                return None
            raise ConfigError(f"{key}=null is not allowed: it must be {self.expected()}{self.why}")
        return self.convert(key, value)

    def convert(self, key: str, value):
        return value

    def expected(self) -> str:
        return "a value"

    def fail(self, key: str, value, what: str | None = None):
        text = what or f"must be {self.expected()}"
        tail = " or null" if self.null and what is None else ""
        raise ConfigError(f"{key}={_show(value)} {text}{tail}{self.why}")


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value)
    return repr(value)


@dataclass(frozen=True)
class Int(Spec):
    low: int | None = None
    high: int | None = 10**9      # every count has a ceiling: 1e23 is a typo, not a request
    whole: bool = field(default=False, kw_only=True)   # a whole float (8.0) counts, as 8

    def expected(self) -> str:
        return "an integer" + _range(self.low, self.high)

    def convert(self, key, value):
        if (self.whole and isinstance(value, float) and math.isfinite(value)
                and value.is_integer()):
            value = int(value)
        if not _is_int(value):
            self.fail(key, value)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            self.fail(key, value, f"is out of range: it must be {self.expected()}")
        return value


@dataclass(frozen=True)
class Float(Spec):
    """A finite number; ``open_low``/``open_high`` exclude the bounds."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def expected(self) -> str:
        return "a finite number" + _range(self.low, self.high, self.open_low, self.open_high)

    def convert(self, key, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, value)
        low_bad = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        high_bad = self.high is not None and (value >= self.high if self.open_high else value > self.high)
        if low_bad or high_bad:
            self.fail(key, value)
        return float(value)


@dataclass(frozen=True)
class Bool(Spec):
    def expected(self) -> str:
        return "true or false"

    def convert(self, key, value):
        if not isinstance(value, bool):
            self.fail(key, value)
        return value


@dataclass(frozen=True)
class Choice(Spec):
    choices: tuple = ()

    def expected(self) -> str:
        return "one of " + ", ".join(map(str, self.choices))

    def convert(self, key, value):
        if isinstance(value, bool) or value not in self.choices:
            raise ConfigError(f"{key}={_show(value)} is not a valid choice; choose from "
                              f"{', '.join(map(str, self.choices))}{' or null' if self.null else ''}")
        return value


@dataclass(frozen=True)
class Text(Spec):
    """A non-empty string (a path, a name)."""

    def expected(self) -> str:
        return "a non-empty string"

    def convert(self, key, value):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.fail(key, value)
        if not str(value).strip():
            self.fail(key, value, "is empty; give a value" + (" (or null)" if self.null else ""))
        return str(value)


def to_list(value) -> list:
    """``key=[a,b]`` as a list; a single value (``key=a``) is a list of one."""
    if value is None:
        return []
    if isinstance(value, (str, int, float, bool)):
        return [value]
    return list(value)


@dataclass(frozen=True)
class ListOf(Spec):
    """A non-empty list whose items each pass ``item``; one value counts as a list of one
    (unless ``single`` is false). ``length``: an exact length."""

    item: Spec = field(default_factory=Spec)
    length: int | None = None
    single: bool = True
    empty: bool = False   # [] allowed

    def expected(self) -> str:
        n = f"{self.length} " if self.length else ""
        return f"a list of {n}{self.item.expected().replace('a ', '', 1).replace('an ', '', 1)}s"

    def convert(self, key, value):
        if isinstance(value, (str, int, float, bool)) and not self.single:
            self.fail(key, value)
        values = to_list(value)
        if not values and not self.empty:
            raise ConfigError(f"{key}={_show(value)} is empty; give at least one value{self.why}")
        if self.length is not None and len(values) != self.length:
            self.fail(key, value)
        out = []
        for v in values:
            try:
                out.append(self.item.check(key, v))
            except ConfigError:
                if isinstance(self.item, Choice):
                    raise ConfigError(f"{key}: {_show(v)} is not a valid choice; choose from "
                                      f"{', '.join(map(str, self.item.choices))}") from None
                raise ConfigError(f"{key}: {_show(v)} must be {self.item.expected()}{self.why}") from None
        return out


@dataclass(frozen=True)
class IntOrList(Spec):
    """An integer, or a non-empty list of integers (e.g. one depth per stack)."""

    item: Int = field(default_factory=Int)

    def expected(self) -> str:
        return f"{self.item.expected()}, or a list of them"

    def convert(self, key, value):
        values = to_list(value)
        if not values or not all(_is_int(v) for v in values) or any(
                (self.item.low is not None and v < self.item.low)
                or (self.item.high is not None and v > self.item.high) for v in values):
            self.fail(key, value)
        return value


@dataclass(frozen=True)
class IntOrAuto(Int):
    """An integer in range, or the word ``auto`` (chosen at run time)."""

    def expected(self) -> str:
        return "auto or " + super().expected()

    def convert(self, key, value):
        if value == "auto":
            return value
        return super().convert(key, value)


@dataclass(frozen=True)
class Anything(Spec):
    """Not checked here (values Hydra resolves at run time, such as out_dir)."""

    resolve: bool = False


@dataclass(frozen=True)
class Group(Spec):
    """A mapping with known keys; ``open``: other keys are allowed and not checked."""

    fields: dict = field(default_factory=dict)
    open: bool = False

    def check(self, key, value):
        if value is None and self.null:
            return None
        if not hasattr(value, "keys"):
            raise ConfigError(f"{key}={_show(value)} must be a group of keys "
                              f"({', '.join(self.fields)})")
        check_node(value, self, key)
        return value


@dataclass(frozen=True)
class Variants(Spec):
    """A config group whose options differ in their keys, told apart by ``name``."""

    options: dict = field(default_factory=dict)

    def check(self, key, value):
        if not hasattr(value, "keys") or "name" not in value:
            raise ConfigError(f"{key} must be a config group with a name; choose from "
                              f"{', '.join(self.options)}")
        name = value["name"]
        if name not in self.options:
            raise ConfigError(f"{key}.name={_show(name)} is not a valid choice; choose from "
                              f"{', '.join(self.options)}")
        check_node(value, self.options[name], key)
        return value


@dataclass(frozen=True)
class Hooks(Spec):
    """``hooks.<name>.<option>``: each hook's own options (``every``: 0 = off)."""

    hooks: dict = field(default_factory=dict)

    def check(self, key, value):
        if value is None:
            return None
        if not hasattr(value, "keys"):
            raise ConfigError(f"{key}={_show(value)} must be a group of hooks; choose from "
                              f"{', '.join(self.hooks)}")
        for name in value:
            if name not in self.hooks:
                raise ConfigError(f"{key}.{name} is not a hook; choose from {', '.join(self.hooks)}")
            options = value[name]
            if options is None:
                continue
            check_node(options, self.hooks[name], f"{key}.{name}")
        return value


# ---------------------------------------------------------------- checker
def _missing(node, key: str) -> bool:
    return OmegaConf.is_config(node) and OmegaConf.is_missing(node, key)


def check_node(node, schema: Group, prefix: str = "") -> None:
    """Every key of ``node`` against ``schema``: unknown keys, missing keys, bad values."""
    dotted = (prefix + ".") if prefix else ""
    for key in node.keys():
        if key not in schema.fields:
            if schema.open:
                continue
            valid = ", ".join(schema.fields)
            near = difflib.get_close_matches(str(key), list(schema.fields), n=1)
            if near:
                raise ConfigError(f"unknown key {dotted}{key!r}; did you mean {dotted}{near[0]}? "
                                  f"(the valid keys here are {valid})")
            raise ConfigError(f"unknown key {dotted}{key!r}; the valid keys here are {valid}")
    for key, spec in schema.fields.items():
        name = dotted + key
        if key not in node.keys():   # a ??? value is "not in" an OmegaConf node, but a key
            if spec.required:
                raise ConfigError(f"{name} is missing: it is required (was it removed with ~{name}?)")
            continue
        if isinstance(spec, Anything) and not spec.resolve:
            continue
        if _missing(node, key):
            raise ConfigError(f"{name} is required: set {name}=...{spec.why}")
        spec.check(name, node[key])


def has_key(task: str, dotted: str) -> bool:
    """Whether ``dotted`` (``model.blocks``) is a key of ``task``'s config (of any option
    of a config group such as ``model``)."""
    nodes = [TASK_SCHEMAS[task]]
    for part in dotted.split("."):
        found = []
        for node in nodes:
            groups = (list(node.options.values()) if isinstance(node, Variants) else
                      [Group(fields=node.hooks)] if isinstance(node, Hooks) else [node])
            found += [g.fields[part] for g in groups if isinstance(g, Group) and part in g.fields]
        if not found:
            return False
        nodes = found
    return True


def check_config(task: str, cfg) -> None:
    """The schema of ``task`` applied to its composed config (without the hydra node)."""
    check_node(cfg, TASK_SCHEMAS[task])


# ------------------------------------------------------------ the schemas
SEED = Int(0, MAX_SEED)
DEPTH = Int(1, MAX_DEPTH)
DEPTHS = ListOf(item=Int(1, MAX_DEPTH))
COUNT = Int(1)
POSITIVE = Float(0, open_low=True)
DEVICE = Choice(choices=DEVICES)
THREADS = IntOrAuto(1, 1024, null=True,
                    why=" (auto: the cores this process may use, shared among a launcher's "
                        "parallel jobs; null: torch's default)")
PROGRESS = Bool()
OUT_DIR = Anything()
FRACTION = Float(0, 1, open_low=True, open_high=True)
VAL_FRACTION = Float(0, 1, open_high=True, required=False,
                     why=" (the share of the training set held out for validation; 0: none)")

_IMAGE_FILES = {
    "root": Text(), "download": Bool(), "num_workers": Int(0, 256),
    "limit": Int(1, null=True), "val_fraction": VAL_FRACTION,
}
DATASET = Variants(options={
    "digits": Group(fields={"name": Text(), "test_fraction": FRACTION, "split_seed": SEED,
                            "val_fraction": VAL_FRACTION}),
    "synthetic": Group(fields={
        "name": Text(), "num_samples": Int(2, 10_000_000), "num_classes": Int(2, 100_000),
        "shape": ListOf(item=Int(1, 65_536), single=False,
                        why=" ([D] for vectors, [C,H,W] for images)"),
        "separation": Float(0), "test_fraction": FRACTION, "seed": SEED,
        "val_fraction": VAL_FRACTION}),
    "mnist": Group(fields={"name": Text(), **_IMAGE_FILES}),
    "fashion_mnist": Group(fields={"name": Text(), **_IMAGE_FILES}),
    "cifar10": Group(fields={"name": Text(), **_IMAGE_FILES, "augment": Bool()}),
    "cifar100": Group(fields={"name": Text(), **_IMAGE_FILES, "augment": Bool()}),
    "imagenet": Group(fields={"name": Text(), **_IMAGE_FILES, "augment": Bool(),
                              "image_size": Int(8, 4096), "resize": Int(8, 8192)}),
    "text": Group(fields={
        "name": Text(), "path": Text(null=True, why=" (a text file; null: a slice of the "
                                                    "standard library's source)"),
        "max_chars": Int(64, null=True, why=" (characters read from the start; null: all)"),
        "context": Int(2, 65_536), "test_fraction": FRACTION, "val_fraction": VAL_FRACTION,
        "split_seed": SEED}),
})
MODEL = Variants(options={
    "mlp": Group(fields={"name": Text(), "hidden": Int(1, MAX_WIDTH, null=True),
                         "activation": Choice(choices=ACTIVATIONS)}),
    "conv": Group(fields={"name": Text()}),
    "transformer": Group(fields={
        "name": Text(), "block": Choice(choices=("parallel", "sequential")),
        "heads": Int(1, 4096), "mlp_ratio": Float(0, 64, open_low=True),
        "dropout": Float(0, 1, open_high=True), "patch": Int(1, 1024)}),
    "resnet": Group(fields={
        "name": Text(), "arch": Choice(choices=ARCHS), "stem": Choice(choices=STEMS),
        "blocks": ListOf(item=Int(1, MAX_DEPTH), length=4, single=False, null=True,
                         why=" (residual functions per stage, e.g. [8,8,8,8])"),
        "pretrained": Text(null=True, why=" (a torchvision state dict file)")}),
})
# rode bench's residual functions: train's mlp and transformer options, the same keys.
BENCH_MODEL = Variants(options={name: MODEL.options[name] for name in ("mlp", "transformer")})
ADJOINT = Group(fields={
    "vjp": Choice(choices=VJPS),
    "anchor_every": Int(1, null=True, why=" (null: no anchors, the paper's adjoint)"),
    "roundtrip": Bool(),
    "max_roundtrip": Float(0, open_low=True, null=True, why=" (null: no tolerance)"),
    "compile": Bool(required=False),
    "segment": Int(1, null=True, required=False,
                   why=" (vjp=exact: steps per autograd call; null: from the state's size)"),
})


def check_values(schema: Group, values: dict, prefix: str, whole: bool = False) -> dict:
    """The given ``values`` of a group (a library call's keyword arguments) checked
    against its specs, as a config's would be; returns them converted (ints, floats).
    ``whole``: whole-number floats (8.0) count as integers."""
    out = {}
    for key, value in values.items():
        spec = schema.fields[key]
        if whole and isinstance(spec, Int):
            spec = replace(spec, whole=True)
        out[key] = spec.check(f"{prefix}.{key}", value)
    return out


_HOOK = {"every": Int(0, why=" (0: off)")}
HOOK_SCHEMA = Hooks(hooks={
    "grad_error": Group(fields={**_HOOK, "batch_size": Int(1, required=False)}),
    "memory": Group(fields={**_HOOK, "batch_size": Int(1, null=True, required=False)}),
    "recon": Group(fields={**_HOOK, "batch_size": Int(1, required=False)}),
    "smoothness": Group(fields=dict(_HOOK)),
}, null=True)

# The residual scaling: step h = N^(-alpha) (runner.stack.depth_step).
ALPHA = Float(0, 1, required=False,
              why=" (the step is depth**-alpha: 1 the ODE's 1/N, 0.5 Depth-muP's 1/sqrt(N), "
                  "0 the standard ResNet)")
# The residual stack: the same keys in every task that builds one.
STACK = {
    "alpha": ALPHA,
    "depth": DEPTH, "width": Int(1, MAX_WIDTH), "method": Choice(choices=tuple(METHODS)),
    "gamma": Float(0, 1, open_low=True, open_high=True, required=False),
    "grad": Choice(choices=GRADS), "init": Choice(choices=INITS), "seed": SEED,
}
TRAINING = {
    "epochs": Int(1, 1_000_000), "batch_size": Int(1, 10_000_000),
    "optimizer": Choice(choices=OPTIMIZERS), "lr": POSITIVE, "momentum": Float(0, 1),
    "parametrization": Choice(choices=PARAMETRIZATIONS, required=False),
    "weight_decay": Float(0), "schedule": Choice(choices=SCHEDULES),
    "device": DEVICE, "amp": Bool(), "progress": PROGRESS, "seed": SEED, "out_dir": OUT_DIR,
}

# Model selection, experiment tracking, determinism: train and finetune.
METRIC_NAMES = ("val_acc", "val_loss", "train_loss", "test_acc", "test_loss", "peak_memory_bytes",
                "seconds", "model_memory_bytes", "saved_activation_bytes", "val_bpc", "test_bpc")
TRACKING = {
    "monitor": Choice(choices=MONITORS, required=False),
    "early_stopping": Group(fields={"patience": Int(1, null=True, why=" (null: off)")},
                            required=False),
    "objective": ListOf(item=Choice(choices=METRIC_NAMES), null=True, required=False,
                        why=" (what a sweeper optimises; null: monitor)"),
    "deterministic": Bool(required=False),
    "logger": Group(fields={
        "tensorboard": Group(fields={"save_dir": Text(null=True)}, required=False),
        "wandb": Group(fields={"mode": Choice(choices=("offline", "online", "disabled")),
                               "project": Text(), "name": Text(null=True), "id": Text(null=True),
                               "save_dir": Text(null=True)}, required=False),
        "mlflow": Group(fields={"tracking_uri": Text(null=True), "experiment_name": Text(),
                                "run_name": Text(null=True)}, required=False),
    }, null=True, required=False),
}

TASK_SCHEMAS: dict[str, Group] = {
    "train": Group(fields={
        "dataset": DATASET, "model": MODEL, "hooks": HOOK_SCHEMA, "adjoint": ADJOINT,
        **STACK, **TRAINING,
        "eval_batch_size": Int(1, 10_000_000), "threads": THREADS,
        "resume": Text(null=True, why=" (a run dir or checkpoint.pt to continue, or auto)"),
        "save": Group(fields={"every_steps": Int(1, null=True, why=" (null: per epoch only)"),
                                    "every_minutes": Float(0, open_low=True, null=True,
                                                           why=" (null: per epoch only)")},
                            required=False),
        **TRACKING,
    }),
    "finetune": Group(fields={
        "checkpoint": Text(why=" (a run dir holding checkpoint.pt, or a checkpoint file)"),
        "depth": IntOrList(item=Int(1, MAX_DEPTH), null=True),
        "grad": Choice(choices=GRADS), "bn_recalibration": Int(0),
        "dataset": Group(fields={"root": Text(null=True), "num_workers": Int(0, 256, null=True),
                                 "val_fraction": Float(0, 1, open_high=True, null=True,
                                                       required=False)}),
        "hooks": HOOK_SCHEMA, "adjoint": ADJOINT, **TRAINING, **TRACKING, "threads": THREADS,
    }),
    "gradcheck": Group(fields={
        "dataset": DATASET, "model": MODEL, "adjoint": ADJOINT,
        **{k: v for k, v in STACK.items() if k != "grad"},
        "batch_size": Int(1, 10_000_000),
        "dtype": Choice(choices=("float64", "float32", "bfloat16", "float16")),
        "amp": Bool(required=False),
        "checkpoint": Text(null=True), "device": DEVICE, "threads": THREADS, "out_dir": OUT_DIR,
    }),
    "memory": Group(fields={
        "dataset": DATASET, "model": MODEL, "adjoint": ADJOINT,
        **{k: v for k, v in STACK.items() if k not in ("grad", "depth")},
        "depths": DEPTHS, "grads": ListOf(item=Choice(choices=GRADS)),
        "batch_size": Int(1, 10_000_000), "steps": COUNT, "threads": THREADS,
        "device": DEVICE, "progress": PROGRESS, "out_dir": OUT_DIR,
    }),
    "bench": Group(fields={
        "depths": DEPTHS, "methods": ListOf(item=Choice(choices=tuple(METHODS))),
        "contenders": ListOf(item=Choice(choices=CONTENDERS)),
        "model": BENCH_MODEL, "tokens": Int(1, 65_536, why=" (the sequence length of model=transformer)"),
        "width": Int(1, MAX_WIDTH), "batch_size": Int(1, 10_000_000),
        "init": ListOf(item=Choice(choices=INITS)),
        "dtype": Choice(choices=("float32", "float64", "bfloat16", "float16")),
        "device": DEVICE, "threads": THREADS, "warmup": Int(0), "repeats": COUNT,
        "memory": Bool(), "compile": Bool(), "seed": SEED, "progress": PROGRESS, "out_dir": OUT_DIR,
        "alpha": ALPHA,
    }),
    "discretization": Group(fields={
        "cases": ListOf(item=Choice(choices=("linear", "tanh"))),
        "weights": ListOf(item=Choice(choices=("constant", "smooth", "rough", "iid"))),
        "methods": ListOf(item=Choice(choices=tuple(METHODS))), "depths": DEPTHS,
        "dim": Int(1, 1024), "batch_size": COUNT, "trials": COUNT, "scale": POSITIVE,
        "modes": COUNT, "ref_steps": Int(1, 100_000_000), "seed": SEED, "progress": PROGRESS,
        "threads": THREADS, "out_dir": OUT_DIR, "alpha": ALPHA,
    }),
    "linear": Group(fields={
        "depths": DEPTHS, "dim": Int(1, 64), "target_scale": Float(0),
        "init": Choice(choices=("zero", "iid")), "init_scale": Float(0),
        "method": Choice(choices=tuple(METHODS)), "grad": Choice(choices=GRADS),
        "lr": POSITIVE, "steps": COUNT, "log_every": COUNT,
        "snapshots": ListOf(item=Int(0), single=False, empty=True,
                            why=" (optimisation steps, e.g. [0,10,100])"),
        "seed": SEED, "progress": PROGRESS, "threads": THREADS, "out_dir": OUT_DIR,
    }),
    "report": Group(fields={
        "dir": Text(why=" (rode report <dir>)"), "out_dir": OUT_DIR,
    }),
}

