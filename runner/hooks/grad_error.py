"""grad_error: the adjoint's gradient against exact backprop, per residual layer."""
from __future__ import annotations

from ..gradmodes import get_grad_mode
from ..measure import gradient_error
from .base import RecordSchema
from .periodic import PeriodicHook


class GradErrorHook(PeriodicHook):
    """On a fixed probe batch of ``batch_size`` training examples, computes the backprop
    and the adjoint gradient of the current weights (whatever ``grad`` the run
    trains with) and logs ``rel_error`` and ``cosine`` (all parameters),
    ``stack_rel_error`` and ``stack_cosine`` (residual functions only), and per
    layer ``layers``, ``layer_rel_error``, ``layer_cosine``.

    The backprop pass stores every activation: for an adjoint run, this is the
    only place activations are stored.
    """

    name = "grad_error"
    record = RecordSchema("layer_rel_error", "relative gradient error, adjoint vs backprop",
                          "stack_rel_error", "gradient error over the residual layers")

    def __init__(self, every: int = 0, batch_size: int = 128, **options):
        super().__init__(every, **options)
        self.batch = int(batch_size)

    def measure(self, run) -> dict:
        x, y = self.probe_batch(run, self.batch)
        adjoint = get_grad_mode("adjoint", **(run.cfg.get("adjoint") or {}))
        r = gradient_error(run.model, x, y, adjoint=adjoint)
        return {"rel_error": r["rel_error"], "cosine": r["cosine"],
                "stack_rel_error": r["stack_rel_error"], "stack_cosine": r["stack_cosine"],
                "layers": [row["layer"] for row in r["layers"]],
                "layer_rel_error": [row["rel_error"] for row in r["layers"]],
                "layer_cosine": [row["cosine"] for row in r["layers"]]}
