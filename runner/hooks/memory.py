"""memory: activation bytes saved per residual layer, and the peak memory of a step."""
from __future__ import annotations

import torch.nn.functional as F

from ..measure import peak_memory, saved_activation_bytes, untouched
from .base import RecordSchema
from .periodic import PeriodicHook


class MemoryHook(PeriodicHook):
    """Runs one probe training step (forward and backward, no optimizer update) on
    ``batch`` training examples (null: the run's ``batch_size``) in train mode,
    with the run's grad mode, and logs ``saved_bytes`` (everything autograd
    saved for backward), ``stack_saved_bytes``, ``stack_output_bytes``,
    ``layer_saved_bytes`` (per residual step), and ``peak_bytes`` with
    ``peak_kind`` (see :func:`runner.measure.peak_memory`); the first
    measurement follows one unmeasured warm-up step.
    """

    name = "memory"
    record = RecordSchema("layer_saved_bytes", "bytes saved for backward per layer",
                          "peak_bytes", "peak memory of a step (bytes)", log=False)

    def __init__(self, every: int = 0, batch_size: int | None = None, **options):
        super().__init__(every, **options)
        self.batch = None if batch_size is None else int(batch_size)
        self._warm = False

    def measure(self, run) -> dict:
        x, y = self.probe_batch(run, self.batch or int(run.cfg.batch_size))
        result = {}

        def step():
            result.update(saved_activation_bytes(run.model, x, y, F.cross_entropy,
                                                 backward=True))

        with untouched(run.model):
            run.model.train()
            if not self._warm:   # one-time allocations (autograd, kernels) are not the step's
                step()
                self._warm = True
            peak, kind = peak_memory(step, run.device)
        return {**result, "peak_bytes": peak, "peak_kind": kind, "batch_size": len(y)}
