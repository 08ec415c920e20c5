"""What the client raises: one exception for every error the API answers with."""

from __future__ import annotations

from typing import Any

import httpx


class ClientError(Exception):
    """Base class of everything this client raises on purpose."""


class ApiError(ClientError):
    """The API answered with an error status.

    ``code`` is the API's machine-readable reason (``invalid_input``, ``not_found``,
    ``conflict``, ...), ``field`` the request field at fault when the API names one
    (``spec.ldreg.k``), ``details`` every field error of a 422.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.details = details or []

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        return f"{self.status} {self.code}: {self.message}{where}"

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        """Read the error body, whichever of the usual shapes it has."""
        try:
            body: Any = response.json()
        except ValueError:
            text = response.text.strip().splitlines()
            return cls(response.status_code, _status_code_name(response), text[0] if text else "")
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            body = body["error"]
        if isinstance(body, dict) and "message" in body:
            return cls(
                response.status_code,
                str(body.get("code") or _status_code_name(response)),
                str(body["message"]),
                _field_text(body.get("field")),
                body.get("details") or body.get("errors"),
            )
        detail = body.get("detail") if isinstance(body, dict) else body
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            # FastAPI's own validation shape: [{"loc": [...], "msg": ..., "type": ...}]
            first = detail[0]
            return cls(
                response.status_code,
                "invalid_input",
                str(first.get("msg", "invalid request")),
                _field_text(first.get("loc")),
                detail,
            )
        return cls(response.status_code, _status_code_name(response), str(detail))


class ServiceUnreachable(ClientError):
    """No answer from the server at all (wrong URL, server down, timeout)."""


class MissingApiKey(ClientError):
    """No API key was given to a client that needs one."""


class JobTimeout(ClientError, TimeoutError):
    """``wait`` ran out of time before the job finished."""


def _status_code_name(response: httpx.Response) -> str:
    return (response.reason_phrase or f"http_{response.status_code}").lower().replace(" ", "_")


def _field_text(field: Any) -> str | None:
    if field is None:
        return None
    if isinstance(field, list | tuple):
        parts = [str(p) for p in field if p not in ("body",)]
        return ".".join(parts) or None
    return str(field)
