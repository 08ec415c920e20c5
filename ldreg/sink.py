"""How training reports progress without knowing who listens.

The worker's sink writes metrics to the database (fenced by attempt); the CLI's sink
draws a progress bar. ``ldreg`` never imports either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class TrainingSink(Protocol):
    def on_train_start(self, *, start_epoch: int, epochs: int, steps_per_epoch: int) -> None:
        """Called once; ``start_epoch`` > 1 when resuming from a checkpoint."""

    def on_step(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
        """After each optimizer step; ``step`` is global (counts across epochs)."""

    def on_epoch_end(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
        """After epoch ``epoch`` (1-based) with its averaged and evaluated metrics."""

    def on_checkpoint(self, *, epoch: int, path: Path) -> None:
        """After a checkpoint for ``epoch`` was written (atomically) at ``path``."""

    def should_stop(self) -> bool:
        """Polled every few steps; True makes training raise ``TrainingCancelled``."""
        ...


class NullSink:
    """A sink that listens to nothing and never stops training."""

    def on_train_start(self, *, start_epoch: int, epochs: int, steps_per_epoch: int) -> None:
        pass

    def on_step(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, *, epoch: int, path: Path) -> None:
        pass

    def should_stop(self) -> bool:
        return False
