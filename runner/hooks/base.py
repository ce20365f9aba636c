"""The Hook base class: the points of the training loop a measurement can act at."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecordSchema:
    """What one of a hook's metrics.jsonl records holds, for whoever reads it (`rode report`):
    ``per_layer`` names the field with one value per residual layer, ``scalar`` the field
    with one number that follows training; the labels say what they measure; ``log``: the
    values span decades (drawn on a log scale)."""

    per_layer: str
    per_layer_label: str
    scalar: str
    scalar_label: str
    log: bool = True


class Hook:
    """Subclasses set ``name`` (and ``record``, the schema of what they log), override the
    points they need, and log with ``run.log(self.name, {...})``."""

    name = ""
    record: RecordSchema | None = None

    def __init__(self, every: int = 1, **options):
        self.every = int(every)
        self.options = options

    def on_train_start(self, run) -> None: ...
    def on_step_end(self, run) -> None: ...
    def on_epoch_end(self, run) -> None: ...
    def on_train_end(self, run) -> None: ...
