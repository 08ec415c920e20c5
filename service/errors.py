"""Errors the service's data layer raises for bad input, scope and state.

They carry a stable machine-readable ``code``, a message that tells the user what to
change, and the request field at fault. The HTTP layer (api/errors.py) maps each
class to a status code; the data layer itself knows nothing about HTTP.
"""

from __future__ import annotations


class ServiceError(Exception):
    code = "error"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        code: str | None = None,
        details: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details
        if code is not None:
            self.code = code


class InvalidInput(ServiceError):
    """A request that can never succeed as written (HTTP 422)."""

    code = "invalid_input"


class NotFound(ServiceError):
    """Missing, or another team's (HTTP 404: never reveal that it exists)."""

    code = "not_found"


class Conflict(ServiceError):
    """An illegal state change, e.g. cancelling a finished job (HTTP 409)."""

    code = "conflict"


class LimitExceeded(ServiceError):
    """A per-team limit on how much may run at once (HTTP 429)."""

    code = "limit_exceeded"


class PayloadTooLarge(ServiceError):
    """An upload over the configured size limit (HTTP 413)."""

    code = "payload_too_large"


# The error codes of a failed job that are the service's own trouble: a worker lost,
# or an unexpected error, after the automatic attempts ran out. A retry may get past
# them. Every other code (a bad spec or dataset, a NaN loss, out of memory) is the
# job's: run unchanged, it fails the same way, so the spec has to change.
INFRASTRUCTURE_ERROR_CODES = frozenset({"worker_lost", "worker_error", "error"})


def error_kind(code: str) -> str:
    """``"infrastructure"`` or ``"user"`` (see ``INFRASTRUCTURE_ERROR_CODES``)."""
    return "infrastructure" if code in INFRASTRUCTURE_ERROR_CODES else "user"
