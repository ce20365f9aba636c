"""Optimizers whose update is one kernel call over flat parameter buffers.

At depth 1000 a model has about 4,000 parameter tensors. torch's optimizers update
them tensor by tensor (even ``fused=True`` keeps Python bookkeeping and a kernel
launch per tensor), which costs a tenth of a training step. :class:`FlatOptimizer`
keeps every trainable parameter as a view of one flat buffer per (device, dtype),
gathers the gradients into one flat gradient, and lets a torch optimizer update
the flat buffer: one kernel call, the same arithmetic. Towards the rest of torch
(schedulers, GradScaler, checkpoints) it looks like the torch optimizer it wraps.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from . import compat, names

# How a parameter group says which implementation steps it: this optimizer's own,
# never taken from a loaded state dict, never copied onto the flat groups.
IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")
# State one value of which serves a whole parameter (the rest is per element).
SCALAR_STATE = ("step",)


class _Flat:
    """One flat buffer, as an ``nn.Parameter`` with a persistent flat gradient, and
    the parameters whose storage is now a view of it (their values copied in)."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.slices, start = [], 0
        for p in params:
            self.slices.append(slice(start, start + p.numel()))
            start += p.numel()
        data = torch.cat([p.detach().reshape(-1) for p in params])
        self.param = nn.Parameter(data)   # shares data's storage
        self.grad = torch.empty_like(data)
        self.grads = []   # the flat gradient's slices, in the parameters' shapes
        for p, where in zip(params, self.slices, strict=True):
            p.data = data[where].view_as(p)
            self.grads.append(self.grad[where].view_as(p))
        # The parameters that have had a gradient at a step: torch keeps state for
        # exactly these.
        self.seen = [False] * len(params)

    def gather(self) -> list[int]:
        """Copy the parameters' gradients into the flat gradient (zeros in the slices of
        those without one) and return the indices of the latter. When none has one,
        the flat gradient is None: the step skips this buffer."""
        grads = [p.grad for p in self.params]
        missing = [i for i, g in enumerate(grads) if g is None]
        if len(missing) == len(grads):
            self.param.grad = None
            return missing
        if missing:
            gone = set(missing)
            self.seen = [seen or i not in gone for i, seen in enumerate(self.seen)]
            for i in missing:
                self.grads[i].zero_()
            compat.foreach_copy_([self.grads[i] for i in range(len(grads)) if i not in gone],
                                [g for g in grads if g is not None])
        else:
            self.seen = [True] * len(grads)
            # One call, no Python per tensor: a third faster than torch.cat of their
            # flattened views, which must reshape each one first.
            compat.foreach_copy_(self.grads, grads)
        self.param.grad = self.grad
        return missing

    def per_element(self, state: dict | None) -> dict[str, torch.Tensor]:
        """The entries of the flat ``state`` that hold a value per element."""
        return {k: v for k, v in (state or {}).items()
                if isinstance(v, torch.Tensor) and v.shape == self.param.shape}

    def hold(self, indices: list[int], state: dict | None) -> dict:
        """Copies of the values and per-element state of the parameters at ``indices``
        (for :meth:`restore`); ``state`` is the flat state before the step, if any."""
        tensors = {"": self.param.detach(), **self.per_element(state)}
        return {k: [t[self.slices[i]].clone() for i in indices] for k, t in tensors.items()}

    def restore(self, indices: list[int], held: dict, state: dict | None) -> None:
        """Put back what :meth:`hold` copied; per-element state that did not exist
        before the step is zero there, as torch creates it at a parameter's first step."""
        tensors = {"": self.param.detach(), **self.per_element(state)}
        for k, t in tensors.items():
            for n, i in enumerate(indices):
                if k in held:
                    t[self.slices[i]] = held[k][n]
                else:
                    t[self.slices[i]] = 0

    def slice_of(self, state: dict, i: int) -> dict:
        """Parameter ``i``'s entry of torch's per-parameter layout: copies of its slices
        of the per-element state, and of the state shared by the whole buffer."""
        per_element = self.per_element(state)
        return {k: (per_element[k][self.slices[i]].view_as(self.params[i]).clone()
                    if k in per_element else v.clone() if isinstance(v, torch.Tensor) else v)
                for k, v in state.items()}

    def join(self, entries: list[dict | None]) -> dict | None:
        """The flat state from the parameters' entries in torch's layout (None: no
        state): per-element state concatenated, zeros for parameters without an entry;
        the shared state (the step count) of the parameter that has taken most steps."""
        self.seen = [bool(e) for e in entries]
        present = [i for i, e in enumerate(entries) if e]
        if not present:
            return None
        lead = max(present, key=lambda i: float(entries[i].get("step", 0)))
        like = self.params[lead]
        flat = {}
        for key, value in entries[lead].items():
            if key in SCALAR_STATE or not (isinstance(value, torch.Tensor) and value.shape == like.shape):
                flat[key] = value.clone() if isinstance(value, torch.Tensor) else value
                continue
            parts = [e[key] if e and key in e else value.new_zeros(p.shape)
                     for e, p in zip(entries, self.params, strict=True)]
            flat[key] = torch.cat([t.to(value.device, value.dtype).reshape(-1) for t in parts])
        return flat


class FlatOptimizer(torch.optim.Optimizer):
    """A torch optimizer (``inner``: Adam, SGD...) stepping flat buffers of the parameters.

        FlatOptimizer(model.parameters(), torch.optim.Adam, lr=1e-3, weight_decay=0.0)

    At construction the trainable parameters of each group are sorted by (device,
    dtype); each set gets one flat buffer, its values copied in, and every parameter's
    storage becomes a view of it (``p.data = flat[o:o+n].view_as(p)``, as FSDP does).
    ``inner`` steps the flat buffers, with ``fused=True`` where its fused kernel takes
    them (else ``foreach=True``), one group per group here. ``step()`` copies each
    group's hyperparameters (lr as a scheduler left it) onto its flat group, copies
    the parameters' gradients into the flat gradients (one ``torch._foreach_copy_``
    per buffer), and steps.

    Everything else is torch's: ``param_groups`` hold the parameters themselves (lr
    schedulers, GradScaler's ``unscale_``, ``zero_grad`` work on them unchanged;
    backward still gives each parameter a gradient tensor of its own), and
    :meth:`state_dict` / :meth:`load_state_dict` use the layout ``inner`` would, with
    per-parameter state: a checkpoint written by either optimizer loads into the other.

    Differences from ``inner`` over the parameters:

    - ``model.to(...)`` (another device or dtype) after construction makes new tensors
      of the parameters, and the flat buffers no longer hold them: build the
      optimizer after moving the model. In-place changes (``model.load_state_dict``,
      ``copy_``, DDP's broadcast) are fine.
    - A parameter without a gradient at a step is left as it is, value and state, as
      torch does, but the state shared by a buffer advances: Adam's step count (its
      bias correction) is one per buffer, so a parameter that skipped steps is later
      corrected with the buffer's count, not its own. A parameter's state starts at
      zero (SGD's momentum buffer: zero, not its first gradient, which differs only
      with ``dampening``). A loaded state dict whose step counts differ takes the
      largest.
    - Parameters with ``requires_grad=False`` at construction are not flattened and
      never updated; one that has a gradient at a step is an error (build the
      optimizer again after unfreezing).
    - GradScaler unscales and checks the per-parameter gradients before ``step()``
      (torch's fused optimizers do that inside their kernel): the same result.
    - The groups' implementation flags (``fused``, ``foreach``...) stay this
      optimizer's own when a state dict written with others is loaded (torch's
      optimizer would switch to the loaded ones).
    - ``state`` is empty: the state lives in ``inner.state``, per flat buffer.
    - Memory: one flat gradient buffer per flat buffer, beside the parameters' own.
    """

    def __init__(self, params, inner: type[torch.optim.Optimizer] = torch.optim.Adam, **hyper):
        super().__init__(params, {})   # the groups, checked as torch checks them
        self._flats = [[_Flat(same) for same in _by_device_and_dtype(group["params"])]
                       for group in self.param_groups]
        self._frozen = [p for group in self.param_groups for p in group["params"]
                        if not p.requires_grad]
        self._member = {p: (flat, i) for flats in self._flats for flat in flats
                        for i, p in enumerate(flat.params)}
        self.inner = _fused_else_foreach(inner, [
            {**_hyper(group), "params": [flat.param for flat in flats]}
            for group, flats in zip(self.param_groups, self._flats, strict=True)], hyper)
        self.defaults = dict(self.inner.defaults)
        for group in self.param_groups:   # the keys torch's add_param_group gives them
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "inner"):   # after construction: its parameters would never step
            raise NotImplementedError("FlatOptimizer takes its parameter groups at construction")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """One step of ``inner`` over the flat buffers; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if any(p.grad is not None for p in self._frozen):
            raise RuntimeError("a parameter frozen (requires_grad=False) when the FlatOptimizer "
                               "was built has a gradient; build the optimizer after unfreezing")
        held = []
        for group, flat_group, flats in zip(self.param_groups, self.inner.param_groups,
                                            self._flats, strict=True):
            flat_group.update(_hyper(group))
            for flat in flats:
                missing = flat.gather()
                if missing and len(missing) < len(flat.params):
                    held.append((flat, missing, flat.hold(missing, self.inner.state.get(flat.param))))
        self.inner.step()
        for flat, missing, kept in held:
            flat.restore(missing, kept, self.inner.state.get(flat.param))
        return loss

    def state_dict(self) -> dict:
        """What ``inner`` over the parameters would give: per-parameter state (copies
        of the flat state's slices) and the parameter groups."""
        self.state = self._per_parameter_state()
        try:
            return super().state_dict()
        finally:
            self.state = defaultdict(dict)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of :meth:`state_dict`'s layout (written by this optimizer or
        by ``inner`` over the same parameters): hyperparameters into the groups, the
        per-parameter state concatenated into the flat state."""
        super().load_state_dict(state_dict)   # checks it, casts the state as torch does
        own = {k: self.defaults[k] for k in IMPLEMENTATION if k in self.defaults}
        for group in self.param_groups:
            for key, value in self.defaults.items():   # keys an older torch did not write
                group.setdefault(key, value)
            group.update(own)
        per_parameter, self.state = self.state, defaultdict(dict)
        flat_state = self.inner.state_dict()
        for flat_group, group in zip(flat_state["param_groups"], self.param_groups, strict=True):
            flat_group.update(_hyper(group))
        flats = [flat for flats in self._flats for flat in flats]
        joined = [flat.join([per_parameter.get(p) for p in flat.params]) for flat in flats]
        flat_state["state"] = {k: s for k, s in enumerate(joined) if s is not None}
        self.inner.load_state_dict(flat_state)

    def _per_parameter_state(self) -> defaultdict:
        """The flat state in torch's layout: parameter -> its state, in the groups' order."""
        state = defaultdict(dict)
        for group in self.param_groups:
            for p in group["params"]:
                flat, i = self._member.get(p, (None, 0))
                flat_state = self.inner.state.get(flat.param) if flat else None
                if flat_state and flat.seen[i]:
                    state[p] = flat.slice_of(flat_state, i)
        return state


def _hyper(group: dict) -> dict:
    """A parameter group's hyperparameters (lr, betas, weight_decay...)."""
    return {k: v for k, v in group.items()
            if k not in ("params", "param_names") and k not in IMPLEMENTATION}


def _by_device_and_dtype(params) -> list[list[nn.Parameter]]:
    """The trainable parameters, each once, in sets of one device and dtype."""
    sets, seen = defaultdict(list), set()
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            sets[p.device, p.dtype].append(p)
    return list(sets.values())


def _fused_else_foreach(inner, groups: list[dict], hyper: dict) -> torch.optim.Optimizer:
    """``inner`` over ``groups`` with its fused kernel where that takes every buffer
    (a floating-point dtype on a device it supports), else its multi-tensor path."""
    def make(**choice):   # the optimizer fills in the groups it is given: copies
        return inner([dict(group) for group in groups], **choice, **hyper)

    if "fused" in hyper or "foreach" in hyper:   # chosen by the caller
        return make()
    try:
        optimizer = make(fused=True)
    except (RuntimeError, ValueError):
        return make(foreach=True)
    if all(compat.fused_supported(inner, p) for group in groups for p in group["params"]):
        return optimizer
    return make(foreach=True)


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (lr, momentum, weight_decay) or Adam (lr, weight_decay) over the model's
    parameters, stepping flat buffers (:class:`FlatOptimizer`). Build it after moving
    the model.

    torch's own optimizers, even fused, pay per tensor. At depth 1000 (4,000 tensors,
    one CPU thread) a training step's Adam update takes 14 ms flat against 33 ms with
    ``torch.optim.Adam(fused=True)``. SGD does less per element, so it gains less
    (12 ms against 14 ms; copying the gradients into the flat gradient is most of
    what is left), but it gains too: both step flat."""
    parametrization = cfg.get("parametrization", "standard") or "standard"
    if parametrization != "standard":
        groups = depth_groups(model, parametrization, cfg.optimizer, float(cfg.lr),
                              float(cfg.weight_decay))
        if cfg.optimizer == "sgd":
            return FlatOptimizer(groups, torch.optim.SGD, lr=cfg.lr, momentum=cfg.momentum,
                                 weight_decay=cfg.weight_decay)
        return FlatOptimizer(groups, torch.optim.Adam, lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        return FlatOptimizer(params, torch.optim.SGD, lr=cfg.lr, momentum=cfg.momentum,
                             weight_decay=cfg.weight_decay)
    return FlatOptimizer(params, torch.optim.Adam, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ------------------------------------------------------- depth-aware parametrizations
PARAMETRIZATIONS = names.PARAMETRIZATIONS
ADAM_EPS = 1e-8   # torch.optim.Adam's default: the eps of a depth-1 network


def depth_factors(parametrization: str, optimizer: str, depth: int, alpha: float) -> dict:
    """How the hyperparameters of the residual functions ("hidden" weights) of a stack
    of ``depth`` functions with step ``depth**-alpha`` scale with depth: factors on
    the base lr, Adam's eps and the weight decay (those of a depth-1 network; the
    embedding and the head keep the base values). The one place the rules live:

    - ``standard``: every factor 1 (the optimizer as it was).
    - ``completep`` (Dey et al., "Don't be lazy: CompleteP enables compute-efficient
      deep transformers", NeurIPS 2025, Table 1, depth exponents for a residual
      multiplier L^-alpha): Adam's hidden lr x N^(alpha-1), eps x N^(-alpha), weight
      decay x N^(1-alpha) (lr x wd constant in depth); with SGD, which the paper does
      not treat, the lr x N^(2 alpha - 1) that keeps each block's update of the same
      order (alpha=1: lr proportional to N, as Marion et al., ICLR 2024, train).
    - ``depth_mup`` (Yang, Yu, Zhu & Hayou, "Tensor Programs VI: feature learning in
      infinite-depth neural networks", ICLR 2024, Depth-muP with multiplier 1/sqrt(L);
      Bordelon, Noci, Li, Hanin & Pehlevan, ICLR 2024): fixed exponents, whatever
      ``alpha`` is: Adam's hidden lr x N^(-1/2), eps x N^(-1/2), weight decay x N^(1/2);
      SGD's hidden lr constant.
    """
    n, a = float(depth), float(alpha)
    if parametrization == "standard":
        return {"lr": 1.0, "eps": 1.0, "weight_decay": 1.0}
    if parametrization == "completep":
        if optimizer == "sgd":
            return {"lr": n ** (2 * a - 1), "eps": 1.0, "weight_decay": 1.0}
        return {"lr": n ** (a - 1), "eps": n ** -a, "weight_decay": n ** (1 - a)}
    if parametrization == "depth_mup":
        if optimizer == "sgd":
            return {"lr": 1.0, "eps": 1.0, "weight_decay": 1.0}
        return {"lr": n ** -0.5, "eps": n ** -0.5, "weight_decay": n ** 0.5}
    raise ValueError(f"parametrization={parametrization!r}: choose from {', '.join(PARAMETRIZATIONS)}")


def depth_groups(model: nn.Module, parametrization: str, optimizer: str, lr: float,
                 weight_decay: float = 0.0, eps: float = ADAM_EPS) -> list[dict]:
    """Parameter groups for ``parametrization`` (see :func:`depth_factors`): one group
    ``io`` (embedding, head, everything outside the residual functions) with the base
    values, and one group ``hidden:<i>`` per ResidualStack with its functions'
    parameters, its depth N and alpha read from the stack. Keys: lr, weight_decay,
    and eps for Adam."""
    from .stack import ResidualStack

    stacks = [m for m in model.modules() if isinstance(m, ResidualStack)]
    groups, taken = [], set()
    for i, stack in enumerate(stacks):
        params = [p for p in stack.functions.parameters() if id(p) not in taken]
        taken.update(id(p) for p in params)
        factors = depth_factors(parametrization, optimizer, stack.depth,
                                getattr(stack, "alpha", 1.0))
        group = {"params": params, "name": f"hidden:{i}", "depth": stack.depth,
                 "lr": lr * factors["lr"], "weight_decay": weight_decay * factors["weight_decay"]}
        if optimizer == "adam":
            group["eps"] = eps * factors["eps"]
        if params:
            groups.append(group)
    rest = [p for p in model.parameters() if id(p) not in taken]
    io = {"params": rest, "name": "io", "lr": lr, "weight_decay": weight_decay}
    if optimizer == "adam":
        io["eps"] = eps
    return [io, *groups] if rest else groups
