"""measure.peak_memory(..., isolated=True): the step's own peak, in a fresh process on CPU."""
import functools

import pytest
import torch

from runner import measure
from runner.tasks.bench import prepared_step

SPEC = {"method": "euler", "width": 256, "hidden": None, "batch": 512, "activation": "tanh",
        "init": "tied", "dtype": "float32", "seed": 0, "threads": 1, "compile": False,
        "alpha": 1.0, "contender": "backprop"}


def isolated(device, **spec):
    return measure.peak_memory(functools.partial(prepared_step, {**SPEC, **spec, "device": device}),
                               torch.device(device), isolated=True)


def test_isolated_peak_runs_in_a_fresh_process_and_counts_the_steps_own_memory():
    shallow, kind = isolated("cpu", depth=4)
    deep, deep_kind = isolated("cpu", depth=16)
    assert kind == deep_kind == measure.ISOLATED_KINDS["cpu"] and kind in measure.PEAK_KINDS
    # backprop keeps each step's activations (batch x width float32 = 512 KiB, two a
    # step): 12 more steps add about 12 MiB; the adjoint stays flat.
    assert deep - shallow > 10 * 2**20
    adjoint, _ = isolated("cpu", depth=16, contender="adjoint")
    assert 0 < adjoint < deep / 2


def test_isolated_peak_refuses_what_it_cannot_measure():
    with pytest.raises(TypeError, match="picklable"):
        measure.peak_memory(lambda: (lambda: None), torch.device("cpu"), isolated=True)
    with pytest.raises(measure.PeakMemoryError, match="KeyError"):   # fails in the child
        measure.peak_memory(functools.partial(prepared_step, {}), torch.device("cpu"),
                            isolated=True)
    assert isolated("cpu", depth=2)[0] > 0   # the server still answers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_isolated_peak_on_cuda():
    shallow, kind = isolated("cuda", depth=4)
    deep, _ = isolated("cuda", depth=16)
    assert kind == measure.ISOLATED_KINDS["cuda"] and kind in measure.PEAK_KINDS
    assert deep - shallow > 10 * 2**20
