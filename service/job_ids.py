"""Job ids and their short prefixes, as people type them.

A job id is 32 hex characters (``uuid4().hex``). Wherever the API takes a job id (the
``/v1/jobs/{id}...`` paths, ``/v1/compare?jobs=``) it also takes a prefix of at least
``MIN_PREFIX_LENGTH`` characters that names exactly one of the team's jobs, as git
takes a short commit hash. Only the team's own jobs are searched, so another team's
jobs neither match nor count towards an ambiguity. A full-length id is looked up
exactly, by the same query as ever; only a shorter one is resolved as a prefix.

Used by the ORM routes (``service.jobs``) and the poll on the event loop
(``api.reads``), which share these rules and messages.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.errors import Conflict, InvalidInput, NotFound

JOB_ID_LENGTH = 32
MIN_PREFIX_LENGTH = 6
# The LIKE escape character; job ids never hold it.
LIKE_ESCAPE = "/"
# Ids listed in an ambiguity's details (the message gives the count).
AMBIGUOUS_SHOWN = 10


def is_prefix(job_id: str) -> bool:
    """True when ``job_id`` is shorter than a full id, so it is resolved as a prefix."""
    return len(job_id) < JOB_ID_LENGTH


def like_pattern(prefix: str) -> str:
    """``prefix`` as a LIKE pattern (``ESCAPE '/'``) that matches the ids starting with it."""
    escaped = "".join(LIKE_ESCAPE + c if c in "%_" + LIKE_ESCAPE else c for c in prefix)
    return escaped + "%"


def too_short(job_id: str, field: str = "id") -> InvalidInput:
    return InvalidInput(
        f"job id {job_id!r} is too short: give the full id or a prefix of at least"
        f" {MIN_PREFIX_LENGTH} characters",
        field=field,
        code="job_id_too_short",
    )


def not_found(job_id: str, field: str = "id") -> NotFound:
    return NotFound(f"no job {job_id} in your team", field=field)


def ambiguous(prefix: str, matches: Sequence[str], field: str = "id") -> Conflict:
    shown = sorted(matches)[:AMBIGUOUS_SHOWN]
    return Conflict(
        f"job id prefix {prefix!r} matches {len(matches)} of your team's jobs; give more"
        " characters",
        field=field,
        code="ambiguous_job_id",
        details=[{"field": field, "message": f"matches {job_id}"} for job_id in shown],
    )


def resolve(prefix: str, matches: Sequence[str], field: str = "id") -> str:
    """The one id among ``matches`` (the team's ids starting with ``prefix``), or the
    error to answer: too short (422), no match (404), several (409)."""
    if len(prefix) < MIN_PREFIX_LENGTH:
        raise too_short(prefix, field)
    if not matches:
        raise not_found(prefix, field)
    if len(matches) > 1:
        raise ambiguous(prefix, matches, field)
    return matches[0]
