"""Measurements on models built around ResidualStacks.

What the theory predicts, made measurable: the adjoint's gradient error against
backprop, the activation memory autograd keeps, the peak memory of a step, how
well the adjoint rebuilds the forward activations, and how smooth the weights
are in depth. The training-loop hooks (``runner/hooks``) and the ``gradcheck``
and ``memory`` tasks are thin wrappers around these functions.

Every function that runs the model leaves it as it found it: parameters and
their ``.grad``, BatchNorm running statistics, train/eval modes, and the random
number generators. So a training run with measurements on follows the same
trajectory as one without.
"""
from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import gc
import importlib
import json
import os
import pickle
import resource
import subprocess
import sys
import warnings
from collections import defaultdict
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .gradmodes import Adjoint, Backprop, GradMode
from .stack import ResidualStack

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# dtype=... of the measurement tasks (gradcheck, bench): name -> torch dtype
DTYPES = {"float64": torch.float64, "float32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------- leave no trace
def residual_stacks(model: nn.Module) -> list[ResidualStack]:
    """The ResidualStacks of ``model`` (the model itself if it is one), in order."""
    return [m for m in model.modules() if isinstance(m, ResidualStack)]


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the CPU (and initialised CUDA) random streams on exit."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run probe passes on ``model``; on exit its buffers (BatchNorm running
    statistics), train/eval modes and the random streams are as they were.
    Parameters are never written by the probes (they use ``autograd.grad``)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    with preserved_rng():
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for m, training in modes:
                m.training = training


@contextlib.contextmanager
def grad_mode_as(model: nn.Module, mode: GradMode) -> Iterator[None]:
    """Temporarily make every ResidualStack of ``model`` use ``mode``; the stacks'
    self-check values (``last_roundtrip_error``) are the training run's again after."""
    stacks = residual_stacks(model)
    saved = [(s.grad_mode, s._roundtrip) for s in stacks]
    for s in stacks:
        s.grad_mode = mode
    try:
        yield
    finally:
        for s, (m, roundtrip) in zip(stacks, saved, strict=True):
            s.grad_mode, s._roundtrip = m, roundtrip


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both vanish), in float64."""
    a, b = a.double(), b.double()
    diff, ref = (a - b).norm().item(), b.norm().item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    na, nb = a.norm().item(), b.norm().item()
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return (a.flatten() @ b.flatten()).item() / (na * nb)


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def layer_groups(model: nn.Module) -> list[tuple[int, list[nn.Parameter]]]:
    """(layer, trainable parameters) for each residual function with its own
    parameters. Layers are numbered across the model's stacks in order; a
    function that repeats an earlier one (tied weights) is not listed again, so
    a tied stack has a single layer, 0, holding the shared parameters."""
    groups, seen, offset = [], set(), 0
    for stack in residual_stacks(model):
        for n, fn in enumerate(stack.functions):
            params = [p for p in fn.parameters() if p.requires_grad]
            if params and not all(id(p) in seen for p in params):
                groups.append((offset + n, params))
            seen.update(id(p) for p in params)
        offset += stack.depth
    return groups


# ------------------------------------------------------------ gradient error
def autocast_of(device: torch.device, amp: bool):
    """(autocast context factory, its dtype name or None) of ``amp=true`` on ``device``:
    bfloat16 on the CPU; on CUDA bfloat16 where the GPU has it, else float16 (the
    caller scales the loss then). A no-op context when ``amp`` is off. The one
    autocast set-up of rode: ``rode train`` (CUDA only) and ``gradcheck`` use it."""
    if not amp:
        return contextlib.nullcontext, None
    dtype = (torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported()
             else torch.float16)
    return (lambda: torch.autocast(device.type, dtype=dtype)), str(dtype).removeprefix("torch.")


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: GradMode,
              loss_fn: Loss = F.cross_entropy, *, autocast: Callable | None = None,
              roundtrips: list | None = None) -> dict[int, torch.Tensor]:
    """{id(parameter): gradient} of ``loss_fn(model(x), y)`` with every stack in
    ``mode``, the forward pass under ``autocast()`` if given (the loss then taken in
    float32 at least). Uses ``autograd.grad``: no ``.grad`` is written. The adjoint's
    self-check values (round-trip errors) of this pass are appended to ``roundtrips``."""
    params = [p for p in model.parameters() if p.requires_grad]
    with grad_mode_as(model, mode), torch.enable_grad():
        with (autocast() if autocast is not None else contextlib.nullcontext()):
            logits = model(x)
        loss = loss_fn(logits.to(torch.promote_types(logits.dtype, torch.float32)), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        if roundtrips is not None:
            roundtrips += [t for t in (s.last_roundtrip_error for s in residual_stacks(model))
                           if t is not None]
    return {id(p): torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)}


def compare_gradients(model: nn.Module, grads: dict[int, torch.Tensor],
                      reference: dict[int, torch.Tensor]) -> dict:
    """Relative error (||g - g_ref|| / ||g_ref||) and cosine of ``grads`` against
    ``reference`` ({id(parameter): gradient}, as :func:`gradients` gives): over all
    trainable parameters (``rel_error``, ``cosine``), over the residual functions only
    (``stack_rel_error``, ``stack_cosine``; nan without any), and per layer
    (``layers``: dicts with ``layer``, ``rel_error``, ``cosine``; see
    :func:`layer_groups` for tied weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = layer_groups(model)
    stack_params = [p for _, ps in groups for p in ps]
    rows = []
    for layer, ps in groups:
        a, b = _flat(grads[id(p)] for p in ps), _flat(reference[id(p)] for p in ps)
        rows.append({"layer": layer, "rel_error": _rel(a, b), "cosine": _cosine(a, b)})
    a_all, b_all = _flat(grads[id(p)] for p in params), _flat(reference[id(p)] for p in params)
    result = {"rel_error": _rel(a_all, b_all), "cosine": _cosine(a_all, b_all),
              "stack_rel_error": float("nan"), "stack_cosine": float("nan"), "layers": rows}
    if stack_params:
        a_st = _flat(grads[id(p)] for p in stack_params)
        b_st = _flat(reference[id(p)] for p in stack_params)
        result.update(stack_rel_error=_rel(a_st, b_st), stack_cosine=_cosine(a_st, b_st))
    return result


def gradient_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                   adjoint: GradMode | None = None, train: bool = True,
                   loss_fn: Loss = F.cross_entropy) -> dict:
    """The adjoint's gradient against exact backprop, on the same weights and batch
    (:func:`compare_gradients` of the two).

    Both passes run in train mode (``train=True``: what a training step
    differentiates; BatchNorm uses batch statistics) from the same random state.
    """
    adjoint = adjoint or Adjoint()
    with untouched(model):
        model.train(train)
        with untouched(model):   # the second pass starts from the same state
            exact = gradients(model, x, y, Backprop(), loss_fn)
        approx = gradients(model, x, y, adjoint, loss_fn)
    return compare_gradients(model, approx, exact)


# ------------------------------------------------------------------- memory
class SavedTensors:
    """Counts the bytes autograd saves for backward while active.

    Each storage counts once (a tensor saved by two operations costs its memory
    once), and storages in ``exclude`` (parameters: they exist anyway) not at all.
    Bytes go to the current ``label``; :func:`saved_activation_bytes` sets it to
    the residual step being run.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.bytes: dict = defaultdict(int)
        self.label = None
        self._seen = {t.untyped_storage().data_ptr() for t in exclude}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):   # sparse, nested...: no plain storage
            self.bytes[self.label] += t.numel() * t.element_size()
            return t
        key = storage.data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.bytes[self.label] += storage.nbytes()
        return t

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs."""
    with SavedTensors(exclude) as meter:
        fn()
    return meter.total


@contextlib.contextmanager
def _labelled_steps(stacks: list[ResidualStack], meter: SavedTensors) -> Iterator[None]:
    """While active, ``meter.label`` names where the stacks are: ``(k, n)`` inside
    step n of stack k, ``(k, None)`` elsewhere in stack k (e.g. the adjoint's
    saved output), ``None`` outside every stack."""
    handles = []

    def enter(label):
        def hook(*_):
            meter.label = label
        return hook

    for k, stack in enumerate(stacks):
        def step(n, x, seed=None, functions=None, _step=stack.step, _k=k):
            outer, meter.label = meter.label, (_k, n)
            try:
                return _step(n, x, seed, functions)
            finally:
                meter.label = outer
        stack.step = step   # an instance attribute shadows the method until deleted
        handles.append(stack.register_forward_pre_hook(enter((k, None))))
        handles.append(stack.register_forward_hook(enter(None)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for stack in stacks:
            del stack.step


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           loss_fn: Loss = F.cross_entropy, *,
                           backward: bool = False) -> dict:
    """Bytes saved for backward by one forward pass of ``loss_fn(model(x), y)``.

    Returns ``saved_bytes`` (the whole pass), ``stack_saved_bytes`` (inside the
    residual stacks), ``layer_saved_bytes`` (per residual step n, across the
    stacks in order: step n of a Heun stack uses functions n and n+1) and
    ``stack_output_bytes`` (saved in a stack outside its steps: the adjoint's
    one stored output). Runs in the model's current mode; ``backward=True`` also
    runs the backward pass (with ``autograd.grad``: no ``.grad`` is written).
    """
    stacks = residual_stacks(model)
    exclude = [*model.parameters(), *model.buffers()]
    with SavedTensors(exclude) as meter, _labelled_steps(stacks, meter), torch.enable_grad():
        loss = loss_fn(model(x), y)
    if backward:
        params = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.grad(loss, params, allow_unused=True)
    del loss
    per_layer = [meter.bytes.get((k, n), 0)
                 for k, s in enumerate(stacks) for n in range(s.num_steps)]
    output = sum(meter.bytes.get((k, None), 0) for k in range(len(stacks)))
    return {"saved_bytes": meter.total, "stack_saved_bytes": sum(per_layer) + output,
            "stack_output_bytes": output, "layer_saved_bytes": per_layer}


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages of ``tensors`` (a storage shared twice counts once)."""
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    """The tensors an optimizer keeps between steps (momenta, second moments, ...);
    of a FlatOptimizer (runner.optim), its inner optimizer's flat state."""
    if optimizer is None:
        return []
    inner = getattr(optimizer, "inner", optimizer)
    return [v for state in inner.state.values() for v in state.values()
            if isinstance(v, torch.Tensor) and v.numel() > 1]


# The byte figures of one training step's model memory, in the order they add up.
MODEL_MEMORY_KEYS = ("saved_activation_bytes", "param_bytes", "grad_bytes",
                     "optimizer_state_bytes", "model_memory_bytes")


def model_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer=None,
                 loss_fn: Loss = F.cross_entropy, autocast: Callable | None = None) -> dict:
    """The memory one training step of ``model`` on the batch ``(x, y)`` needs for
    the network itself, on any device: ``saved_activation_bytes`` (what autograd
    keeps for the backward pass, measured as ``rode memory`` measures it: saved-tensor
    hooks on one real forward pass in training mode), ``param_bytes`` and
    ``grad_bytes`` (one gradient per trainable parameter), ``optimizer_state_bytes``
    (the tensors ``optimizer`` keeps between steps, as it holds them now) and their
    sum ``model_memory_bytes``. The model is left untouched (parameters, ``.grad``,
    BatchNorm statistics, modes, random streams): no optimizer step is taken."""
    with untouched(model):
        model.train()
        with (autocast() if autocast is not None else contextlib.nullcontext()):
            saved = saved_activation_bytes(model, x, y, loss_fn)["saved_bytes"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = _bytes(model.parameters())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    state = _bytes(optimizer_state_tensors(optimizer))
    return dict(zip(MODEL_MEMORY_KEYS, (saved, params, grads, state,
                                        saved + params + grads + state), strict=True))


def proc_status(key: str) -> int:
    """A byte figure (VmRSS, VmHWM, ...) from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        proc_status("VmHWM")
        return True
    except OSError:
        return False
    except KeyError:
        return False


def _release_free_memory() -> None:
    """Give freed heap memory back to the OS, so that the next peak is measured
    from what is really in use (glibc keeps freed blocks resident otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# What a peak-memory figure measures (the ``*_kind`` beside every peak in rode's outputs).
PEAK_KINDS = {
    "cuda_max_memory_allocated": "CUDA: the allocator's peak, everything allocated included "
                                 "(weights, optimizer state, activations)",
    "cpu_peak_rss_growth": "CPU on Linux: how far the process's peak resident set rose above "
                           "its size just before the step, after freed heap memory was returned",
    "process_peak_rss": "the process's lifetime peak resident set (coarse upper bound)",
    # isolated=True: the step's own peak, above what its inputs and one warm-up step hold
    "cpu_peak_rss_over_baseline": "CPU on Linux, isolated: in a fresh process, how far the peak "
                                  "resident set rose above its size once the step was prepared "
                                  "and warmed up (blocks of a page or more served by mmap)",
    "cuda_max_allocated_over_baseline": "CUDA, isolated: the allocator's peak during the step "
                                        "above what was allocated before it, after a warm-up step",
}


# The kind of ``peak_memory(..., isolated=True)`` on each device type.
ISOLATED_KINDS = {"cpu": "cpu_peak_rss_over_baseline", "cuda": "cuda_max_allocated_over_baseline"}


class PeakMemoryError(RuntimeError):
    """An isolated measurement that failed (the measuring process died, ...)."""


def peak_memory(step: Callable[[], object] | None, device: torch.device, *,
                isolated: bool = False) -> tuple[int, str]:
    """(bytes, kind) for the peak memory of ``step()`` on ``device``, or, with
    ``step=None``, of the process (CUDA: the allocator's peak since the last reset)
    so far. ``kind`` is one of :data:`PEAK_KINDS`. On CUDA running a step resets
    the peak statistics.

    ``isolated=True``: the step's own peak, above what it starts from. ``step`` is
    then a picklable callable that prepares the step (builds its model and batch)
    and returns it; the step runs once to warm up (lazy one-time allocations), then
    once measured. On CPU all of it happens in a fresh process forked for it from a
    server that has imported torch (the peak mark of a process that ran other steps
    says little about this one): ``cpu_peak_rss_over_baseline``. On CUDA it runs in
    this process: ``cuda_max_allocated_over_baseline``. Raises
    :class:`PeakMemoryError` when the measurement fails."""
    if isolated:
        if device.type == "cuda":
            return _isolated_peak(step, device)
        return _isolated_server().measure(step)
    if device.type == "cuda":
        if step is None:
            return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    if step is not None:
        _release_free_memory()
        if _reset_peak_rss():
            before = proc_status("VmRSS")
            step()
            return max(0, proc_status("VmHWM") - before), "cpu_peak_rss_growth"
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"


def _isolated_peak(prepare: Callable[[], Callable[[], object]],
                   device: torch.device) -> tuple[int, str]:
    """The measurement of ``peak_memory(prepare, device, isolated=True)``, in the
    process that runs it (on CPU: a fresh one)."""
    cpu = device.type != "cuda"
    if cpu:
        try:   # large blocks straight from mmap and back on free (no dynamic
            # threshold): the resident set follows the live tensors
            ctypes.CDLL("libc.so.6").mallopt(-3, 4096)   # M_MMAP_THRESHOLD: a page
        except (OSError, AttributeError):
            pass
    step = prepare()
    step()   # warm-up
    if cpu:
        _release_free_memory()
        before = proc_status("VmRSS")
        if not _reset_peak_rss():
            raise PeakMemoryError("the peak resident set cannot be reset here "
                                  "(/proc/self/clear_refs: Linux only)")
        step()
        return proc_status("VmHWM") - before, ISOLATED_KINDS["cpu"]
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, ISOLATED_KINDS["cuda"]


# What the measured steps would otherwise import in every forked child: what
# autograd.grad pulls in on its first call (most of a second), and the optional
# libraries of rode's bench contenders (runner.contenders; seconds for torchdiffeq).
_SERVER_PRELOAD = ("torch.fx.experimental.symbolic_shapes", "torch.utils.checkpoint",
                   "torchdiffeq", "memcnn")


def _serve() -> None:
    """The isolated-measurement server: reads one pickled ``prepare`` per line
    (base64), measures it in a child forked for it, answers one JSON line. Forking
    from here is cheap (torch is imported) and safe (no torch thread has started)."""
    for module in _SERVER_PRELOAD:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(module)
        except ImportError:
            pass
    gc.collect()
    gc.freeze()   # the forked children's collections skip torch's own objects
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)   # whatever else gets printed goes to stderr
    cpu = torch.device("cpu")
    for line in sys.stdin:
        try:   # unpickled here: the modules it needs are imported once, not per child
            prepare = pickle.loads(base64.b64decode(line))
        except Exception as e:  # noqa: BLE001 - reported to the caller
            answers.write(json.dumps(["error", f"{type(e).__name__}: {e}"]) + "\n")
            answers.flush()
            continue
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:   # the child
            os.close(read)
            try:
                result = ["ok", _isolated_peak(prepare, cpu)[0]]
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                result = ["error", f"{type(e).__name__}: {e}"]
            with os.fdopen(write, "w") as f:
                f.write(json.dumps(result))
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if not data:
            signal = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            data = json.dumps(["error", f"the measuring process died (signal {signal}, "
                                        f"out of memory?)" if signal else
                                        f"the measuring process exited with {os.WEXITSTATUS(status)}"])
        answers.write(data + "\n")
        answers.flush()


class _Server:
    """The client of :func:`_serve`: one server process, started on first use and
    stopped when this process exits."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from runner.measure import _serve; _serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def measure(self, prepare) -> tuple[int, str]:
        try:
            line = base64.b64encode(pickle.dumps(prepare)).decode()
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise TypeError("peak_memory(isolated=True) on CPU needs a picklable callable that "
                            "prepares the step (a module-level function, or functools.partial "
                            f"of one), not {prepare!r}: {e}") from None
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
            status, value = json.loads(self.process.stdout.readline())
        except (OSError, ValueError) as e:
            status, value = "error", f"the measuring server failed ({type(e).__name__})"
        if status != "ok":
            raise PeakMemoryError(value)
        return int(value), ISOLATED_KINDS["cpu"]

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait()


_server: _Server | None = None


def _isolated_server() -> _Server:
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = _Server()
        atexit.register(_server.close)
    return _server


# ----------------------------------------------------------- reconstruction
def stack_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The input each ResidualStack receives when ``model(x)`` runs (no grad)."""
    seen: list[torch.Tensor] = []
    handles = [s.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
               for s in residual_stacks(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def reconstruction_error(model: nn.Module, x: torch.Tensor, *, train: bool = True) -> dict:
    """How well the adjoint's backward rebuild recovers the forward activations.

    For each stack: the true states x_0..x_S (:meth:`ResidualStack.trajectory`)
    and the states rebuilt from x_S (:meth:`ResidualStack.rebuild`), with the
    same random seed. Returns ``layer_rel_error`` (per step n = 0..S-1, across
    stacks: ||x̃_n - x_n|| / ||x_n||), ``round_trip`` (||x̃_0 - x_0|| / ||x_0||,
    the largest over stacks) and ``max_rel_error``.
    """
    per_layer, round_trips = [], []
    with untouched(model), torch.no_grad():
        model.train(train)
        for stack, x0 in zip(residual_stacks(model), stack_inputs(model, x), strict=True):
            seed = stack.new_pass_seed()
            true = stack.trajectory(x0, seed)
            rebuilt = stack.rebuild(true[-1], seed)
            errors = [_rel(rebuilt[n], true[n]) for n in range(stack.num_steps)]
            per_layer += errors
            round_trips.append(errors[0])
    return {"round_trip": max(round_trips, default=0.0),
            "max_rel_error": max(per_layer, default=0.0), "layer_rel_error": per_layer}


# --------------------------------------------------------------- smoothness
@torch.no_grad()
def smoothness(model: nn.Module) -> dict:
    """How smooth the residual weights are in depth.

    θ_n: all parameters of residual function n, flattened. ``smoothness`` is
    N · max_n ||θ_{n+1} - θ_n|| / max_n ||θ_n|| (the largest over stacks): O(1)
    in N for weights on a smooth path, growing like N for i.i.d. weights, 0 for
    tied weights. ``increments`` lists ||θ_{n+1} - θ_n|| (n = 0..N-2) across stacks.
    """
    value, max_inc, max_norm, increments = 0.0, 0.0, 0.0, []
    for stack in residual_stacks(model):
        thetas = [_flat([p.detach() for p in fn.parameters()] or [torch.zeros(1)])
                  for fn in stack.functions]
        norms = [t.norm().item() for t in thetas]
        # Functions of different kinds alternate (a sequential transformer: attention,
        # MLP, ...): each is compared with the last one of its kind, p functions back.
        p = next(k for k in range(1, len(thetas) + 1)
                 if all(a.shape == b.shape for a, b in zip(thetas, thetas[k:], strict=False)))
        incs = [(b - a).norm().item() for a, b in zip(thetas, thetas[p:], strict=False)]
        increments += incs
        top = max(norms)
        max_norm = max(max_norm, top)
        if incs:
            max_inc = max(max_inc, max(incs))
            if top > 0:
                value = max(value, (stack.depth // p) * max(incs) / top)
    return {"smoothness": value, "max_increment": max_inc, "max_norm": max_norm,
            "increments": increments}
