"""A hook that measures at the start of training, every ``every`` steps, and at the end."""
from __future__ import annotations

from ..measure import preserved_rng
from .base import Hook


class PeriodicHook(Hook):
    """Subclasses implement ``measure(run) -> dict``; each result becomes one
    metrics.jsonl line ``{"hook": name, "epoch": ..., "step": ..., **result}``.
    Measurements happen at step 0 (before training), at every ``every``-th step,
    and after the last step if it was not a multiple of ``every``."""

    def __init__(self, every: int = 0, **options):
        super().__init__(every, **options)
        self._probe = None

    def measure(self, run) -> dict:
        raise NotImplementedError

    def probe_batch(self, run, size: int):
        """The run's fixed probe batch, fetched once without touching the random streams."""
        if self._probe is None:
            with preserved_rng():
                self._probe = run.probe_batch(size)
        return self._probe

    def _log(self, run) -> None:
        with preserved_rng():
            run.log(self.name, self.measure(run))

    def on_train_start(self, run) -> None:
        self._log(run)

    def on_step_end(self, run) -> None:
        if run.step % self.every == 0:
            self._log(run)

    def on_train_end(self, run) -> None:
        if run.step % self.every != 0:
            self._log(run)
