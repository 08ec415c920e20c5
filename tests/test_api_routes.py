"""Static checks on the API's route table (no server, no database)."""

from __future__ import annotations

import inspect
import typing

from fastapi import Response
from fastapi.routing import APIRoute

from api.deps import get_db
from api.routes import compare, jobs, uploads


def _uses_session(route: APIRoute) -> bool:
    pending = list(route.dependant.dependencies)
    while pending:
        dependency = pending.pop()
        if dependency.call is get_db:
            return True
        pending.extend(dependency.dependencies)
    return False


def test_sync_routes_with_a_session_return_a_serialized_response() -> None:
    """A sync route that returned a model would be validated again in a second
    threadpool hop with its session's connection still held: the deadlock that
    ``api.schemas.json_response`` avoids (tests/service/test_reads.py shows it)."""
    checked = []
    for router in (jobs.router, uploads.router, compare.router):
        for route in router.routes:
            if not isinstance(route, APIRoute) or not _uses_session(route):
                continue
            if inspect.iscoroutinefunction(route.endpoint):
                continue  # validated on the event loop, no second hop
            returned = typing.get_type_hints(route.endpoint)["return"]
            assert issubclass(returned, Response), f"{route.name} returns {returned}"
            checked.append(route.name)
    assert {"list_jobs", "submit_job", "get_job_metrics", "compare_jobs"} <= set(checked)
