"""Errors the science library raises, each with a stable ``code``.

The worker maps ``UserError`` subclasses to a failed job with no automatic retry
(the user must change something) and anything else to an infrastructure failure
that may be retried. No web, queue or database code here.
"""

from __future__ import annotations


class LDRegError(Exception):
    """Base class; ``code`` is a stable machine-readable reason."""

    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class UserError(LDRegError):
    """The job's input is wrong; retrying without changing it cannot help."""

    code = "invalid_input"


class DatasetError(UserError):
    """A dataset is missing, malformed, or outside the data root."""

    code = "dataset_error"


class NonFiniteLossError(UserError):
    """The loss became NaN or inf; names the epoch, step and last good checkpoint."""

    code = "loss_not_finite"


class TrainingCancelled(LDRegError):
    """Raised by the training loop when its sink asks it to stop."""

    code = "cancelled"
