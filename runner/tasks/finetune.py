"""rode finetune: refine a model trained with tied weights.

The paper's refining experiment: a ResNet whose residual functions are tied
within each stage is constant in depth, hence smooth, so the adjoint trains it
well. Untie it (every layer gets its own copy of the shared function), optionally
change the depth N -> N' by interpolating the weights in depth, and fine-tune
it with ``grad=adjoint``: no activation memory is spent inside the stacks.

Writes metrics.jsonl, checkpoint.pt (loadable by a further ``finetune``) and
summary.json with the accuracy before and after, and the memory used.
"""
from __future__ import annotations

import copy
import logging
import math
import re
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from .. import checkpoint
from ..config import check_depths
from ..data import build_dataset, make_loader
from ..engine import evaluate, seed_everything, train
from ..errors import ConfigError
from ..gradmodes import Backprop
from ..io import append_jsonl, format_size, write_json
from ..measure import grad_mode_as, saved_activation_bytes, untouched
from ..models import build_model, grad_mode_from_config
from ..preflight import check_amp, resolve_device
from ..reporting import Job, fmt, table
from ..schema import METHODS
from ..stack import ResidualStack, depth_step
from ..threads import apply as apply_threads
from ..threads import loader_workers
from ..vision import check_dataset_files

log = logging.getLogger("rode")

# Keys of this task's config that are not training knobs for the checkpoint's run.
# out_dir is set by run(): it cannot be resolved before Hydra's app starts.
_OWN_KEYS = ("checkpoint", "depth", "dataset", "bn_recalibration", "out_dir")


# ------------------------------------------------------------- refining
def resample_depth(functions: list[nn.Module], depth: int) -> list[nn.Module]:
    """``depth`` new residual functions, each with its own parameters.

    Layer n of N sits at t = n/N (θ_n = θ(n/N)); new layer m gets θ(m/N') on the
    piecewise-linear path through the old layers (held constant after the last).
    Buffers (BatchNorm running statistics) are interpolated the same way. Tied
    layers give N' copies of the shared function; N' = N gives plain copies.
    """
    n = len(functions)
    states = [f.state_dict() for f in functions]
    out = []
    for m in range(depth):
        s = m * n / depth
        i = min(int(s), n - 1)
        j, w = min(i + 1, n - 1), s - i
        block = copy.deepcopy(functions[i])   # a copy per layer: the weights are untied
        if w > 0 and j != i:
            block.load_state_dict({
                k: torch.lerp(v, states[j][k], w) if v.is_floating_point() else v
                for k, v in states[i].items()})
        out.append(block)
    return out


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, device, batches: int) -> int:
    """Re-estimate the running statistics of the BatchNorms inside the stacks from
    ``batches`` training batches (a plain average; no weight changes). Returns the
    number of batches used.

    The statistics of a model trained before untying may not fit the new layers
    (interpolated in depth, or, in checkpoints from before init_tied kept one
    BatchNorm per layer, averaged over all layers of a stack).
    """
    norms = [m for stack in model.modules() if isinstance(stack, ResidualStack)
             for m in stack.functions.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms or batches <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None   # cumulative average over the batches seen
    model.train()
    used = 0
    for x, _ in loader:
        if used == batches:
            break
        model(x.to(device))
        used += 1
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return used


def is_tied(stack: ResidualStack) -> bool:
    """Whether some layers share parameters (the same module repeated, or modules
    sharing their parameters but not their BatchNorm buffers: see init_tied)."""
    seen: set[int] = set()
    for f in stack.functions:
        params = {id(p) for p in f.parameters()}
        if params & seen:
            return True
        seen |= params
    return False


def refine(model: nn.Module, depths: list[int], grad) -> None:
    """Make every ResidualStack of ``model`` (in order) untied, of the given depth,
    with ``grad``; the method stays. The step size scales with the depth (1/N ->
    1/N' by default; N'^(-alpha) for a stack trained with alpha < 1). In place: the
    model (or stack) object stays the same."""
    stacks = [m for m in model.modules() if isinstance(m, ResidualStack)]
    for stack, depth in zip(stacks, depths, strict=True):
        alpha = getattr(stack, "alpha", 1.0)
        step = (stack.step_size * stack.depth / depth if alpha == 1.0
                else depth_step(depth, alpha))
        new = ResidualStack(resample_depth(list(stack.functions), depth), stack.integrator, grad,
                            step_size=step, preserve_rng=stack.preserve_rng, alpha=alpha)
        stack.functions, stack.step_size, stack.grad_mode, stack.alpha = (
            new.functions, new.step_size, new.grad_mode, new.alpha)


# ---------------------------------------------------------- checkpoints
_FUNCTION_KEY = re.compile(r"^(.*?)\.?functions\.(\d+)\.")


def stack_depths(state: dict) -> list[int]:
    """Depth of each ResidualStack in a state dict, in order (from the key names)."""
    depths: dict[str, int] = {}
    for key in state:
        m = _FUNCTION_KEY.match(key)
        if m:
            depths[m[1]] = max(depths.get(m[1], 0), int(m[2]) + 1)
    return list(depths.values())


def new_depths(cfg, old: list[int]) -> list[int]:
    """The ``depth`` knob as one depth per stack (null: keep the old ones)."""
    value = cfg.depth
    if value is None:
        return list(old)
    values = list(value) if OmegaConf.is_list(value) else [value] * len(old)
    if len(values) != len(old) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"depth={_show(value)}: give one integer, or a list of "
                          f"{len(old)} integers (the checkpoint has {len(old)} stacks of "
                          f"depths {old})")
    return values


def _show(value) -> str:
    return str(OmegaConf.to_container(value)) if OmegaConf.is_config(value) else repr(value)


def job_config(cfg, saved: dict, depths: list[int]):
    """The config of the fine-tuning run: the checkpoint's, with this task's training
    knobs, dataset overrides and the new structure (untied, depth N')."""
    job = OmegaConf.create(saved)
    for key in cfg:
        if key not in _OWN_KEYS:
            value = cfg[key]
            job[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(
                value) else value
    for key, value in (cfg.get("dataset") or {}).items():
        if value is not None:
            job.dataset[key] = value
    # Untied layers: a rebuild from this config has one function per layer (the
    # weights then come from the checkpoint), and the new depths.
    job.init = "iid"
    if job.model.name == "resnet":
        job.model.blocks = depths
        job.model.pretrained = None
    elif len(depths) == 1:
        job.depth = depths[0]
    job.finetune = {"checkpoint": str(checkpoint.locate(cfg.checkpoint))}
    return job


# ----------------------------------------------------------------- task
def validate(cfg) -> None:
    """The checkpoint (it must rebuild its model), the new depths against its method,
    the device and the dataset's files (the schema checked the training knobs)."""
    ckpt = checkpoint.load(cfg.checkpoint)
    checkpoint.check_rebuilds(ckpt, ckpt["config"], f"checkpoint={cfg.checkpoint}")
    check_amp(cfg)
    old = stack_depths(ckpt["model"])
    if not old:
        raise ConfigError(f"checkpoint={cfg.checkpoint}: the model has no residual stack")
    depths = new_depths(cfg, old)
    method = ckpt["config"].get("method", "euler")
    check_depths(depths, [method if method in METHODS else "euler"], "depth")
    check_dataset_files(job_config(cfg, ckpt["config"], depths).dataset)


def run(cfg) -> dict:
    apply_threads(cfg)
    path = checkpoint.locate(cfg.checkpoint)
    ckpt = checkpoint.load(path)
    old = stack_depths(ckpt["model"])
    depths = new_depths(cfg, old)
    job = job_config(cfg, ckpt["config"], depths)
    job.out_dir = str(cfg.out_dir)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)

    # ---- the checkpoint's model, as it was trained
    data = build_dataset(job.dataset)
    built = OmegaConf.create(ckpt["config"])
    if built.model.get("pretrained"):
        built.model.pretrained = None   # the checkpoint holds the weights
    model = build_model(built, data.input_shape, data.num_classes)
    model.load_state_dict(ckpt["model"])
    model.to(device)
    workers = loader_workers(cfg, job.dataset)
    loader = dict(seed=cfg.seed, num_workers=workers, pin_memory=device.type == "cuda")
    test_loader = make_loader(data.test, 1024, shuffle=False, **loader)
    tied = [is_tied(m) for m in model.modules() if isinstance(m, ResidualStack)]
    if not any(tied):
        log.warning("checkpoint %s has no tied stack; untying changes nothing", path)
    _, acc_before = evaluate(model, test_loader, device)

    # ---- untie, change depth, switch to the fine-tuning grad mode
    grad = grad_mode_from_config(cfg)
    refine(model, depths, grad)
    train_loader = make_loader(data.train, cfg.batch_size, shuffle=True, **loader)
    used = recalibrate_batchnorm(model, train_loader, device, int(cfg.bn_recalibration))
    _, acc_untied = evaluate(model, test_loader, device)

    # ---- activation memory of one training step: backprop against this grad mode
    x, y = next(iter(make_loader(data.train, cfg.batch_size, shuffle=False, seed=0)))
    x, y = x.to(device), y.to(device)
    with untouched(model):
        model.train()
        with grad_mode_as(model, Backprop()):
            bp = saved_activation_bytes(model, x, y)
        ours = saved_activation_bytes(model, x, y)

    # ---- fine-tune
    summary = train(job, model=model, data=data)
    record = {"checkpoint": str(path), "tied": tied, "depth_before": old, "depth_after": depths,
              "grad": cfg.grad, "acc_before": acc_before, "acc_untied": acc_untied,
              "bn_recalibration_batches": used,
              "acc_after": summary["test_acc"], "batch": len(y),
              "saved_bytes_backprop": bp["saved_bytes"],
              "stack_saved_bytes_backprop": bp["stack_saved_bytes"],
              f"saved_bytes_{cfg.grad}": ours["saved_bytes"],
              f"stack_saved_bytes_{cfg.grad}": ours["stack_saved_bytes"]}
    summary.update(record)
    write_json(summary, Path(cfg.out_dir) / "summary.json")
    append_jsonl({"event": "finetune", **record}, Path(cfg.out_dir) / "metrics.jsonl")

    mib = 2.0 ** 20
    print(f"rode finetune: test accuracy {100 * acc_before:.2f}% (checkpoint, depth {old}) -> "
          f"{100 * acc_untied:.2f}% (untied, depth {depths}"
          f"{', BatchNorm statistics per layer' if used else ''}) -> "
          f"{100 * summary['test_acc']:.2f}% after {summary['epochs']} epoch(s) with "
          f"grad={cfg.grad}", flush=True)
    print(f"  activation memory of one step (batch {len(y)}): backprop "
          f"{bp['saved_bytes'] / mib:.2f} MiB ({bp['stack_saved_bytes'] / mib:.2f} in the stacks), "
          f"{cfg.grad} {ours['saved_bytes'] / mib:.2f} MiB "
          f"({ours['stack_saved_bytes'] / mib:.2f} in the stacks); peak memory "
          f"{summary['peak_memory_bytes'] / mib:.0f} MiB ({summary['peak_memory_kind']}) "
          f"-> {cfg.out_dir}", flush=True)
    return summary


# ------------------------------------------------------------------ report
def report_section(jobs: list[Job], out: Path, figures: list[str]) -> str:
    done = [j for j in jobs if j.status == "completed" and "acc_before" in j.summary]
    if not done:
        return ""
    body = []
    for j in done:
        s = j.summary
        grad = s.get("grad", "")
        untied = s.get("acc_untied", s.get("acc_refined", math.nan))   # acc_refined: older name
        body.append([f"`{j.name}`", _depths(s.get("depth_before")), _depths(s.get("depth_after")),
                     grad, f"{100 * s['acc_before']:.2f}", f"{100 * untied:.2f}",
                     f"{100 * s.get('acc_after', s.get('test_acc', math.nan)):.2f}",
                     format_size(s.get("stack_saved_bytes_backprop")),
                     format_size(s.get(f"stack_saved_bytes_{grad}"))])
    return "\n".join([
        "## Fine-tuning untied models (`rode finetune`)", "",
        table(["job", "depth before", "depth after", "grad", "acc before %", "untied %",
               "after %", "stack activations (backprop)", "stack activations (this grad)"], body)])


def _depths(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else fmt(value)


def report_result(job: Job) -> str:
    s = job.summary
    return f"test acc {100 * s['test_acc']:.2f}%" if "test_acc" in s else ""
