"""recon: how well the adjoint's backward rebuild recovers the forward activations."""
from __future__ import annotations

from ..measure import reconstruction_error
from .base import RecordSchema
from .periodic import PeriodicHook


class ReconHook(PeriodicHook):
    """On a fixed probe batch, logs ``layer_rel_error`` (per residual step n:
    ||x̃_n - x_n|| / ||x_n||, x̃ rebuilt backward from the output as the adjoint
    does), ``round_trip`` (||x̃_0 - x_0|| / ||x_0||) and ``max_rel_error``."""

    name = "recon"
    record = RecordSchema("layer_rel_error", "reconstruction error ||x~_n - x_n|| / ||x_n||",
                          "max_rel_error", "largest reconstruction error")

    def __init__(self, every: int = 0, batch_size: int = 128, **options):
        super().__init__(every, **options)
        self.batch = int(batch_size)

    def measure(self, run) -> dict:
        x, _ = self.probe_batch(run, self.batch)
        return reconstruction_error(run.model, x)
