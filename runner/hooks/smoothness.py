"""smoothness: are the residual weights smooth in depth, and do they stay so?"""
from __future__ import annotations

from ..measure import smoothness
from .base import RecordSchema
from .periodic import PeriodicHook


class SmoothnessHook(PeriodicHook):
    """Logs ``smoothness`` = N · max_n ||θ_{n+1} - θ_n|| / max_n ||θ_n||,
    ``max_increment``, ``max_norm`` and the per-layer ``increments``
    ||θ_{n+1} - θ_n||. Reads the weights only."""

    name = "smoothness"
    record = RecordSchema("increments", "weight increment ||θ_{n+1} - θ_n||",
                          "smoothness", "N · max increment / max norm", log=False)

    def measure(self, run) -> dict:
        return smoothness(run.model)
