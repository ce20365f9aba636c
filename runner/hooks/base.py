"""The Hook base class: the points of the training loop a measurement can act at."""
from __future__ import annotations


class Hook:
    """Subclasses set ``name``, override the points they need, and log with
    ``run.log(self.name, {...})``."""

    name = ""

    def __init__(self, every: int = 1, **options):
        self.every = int(every)
        self.options = options

    def on_train_start(self, run) -> None: ...
    def on_step_end(self, run) -> None: ...
    def on_epoch_end(self, run) -> None: ...
    def on_train_end(self, run) -> None: ...
