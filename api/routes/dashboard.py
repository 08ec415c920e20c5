"""The web dashboard: static files under /dashboard/, its page at /.

The page is plain HTML, CSS and JavaScript (api/dashboard/, no build step) with
Chart.js vendored under api/dashboard/vendor/; it talks to the same HTTP API v1 as
every other client, with the team key the user pastes (kept in sessionStorage).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard"

router = APIRouter(include_in_schema=False)


@router.get("/")
def dashboard_page() -> FileResponse:
    # no-cache: after an upgrade the browser revalidates and picks up the new page.
    return FileResponse(DASHBOARD_DIR / "index.html", headers={"Cache-Control": "no-cache"})


class _Revalidated(StaticFiles):
    """Static files that browsers revalidate (ETag) instead of caching blindly, so an
    upgraded API never runs with last release's scripts."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.setdefault("Cache-Control", "no-cache")
        return response


def install_dashboard(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/dashboard", _Revalidated(directory=DASHBOARD_DIR), name="dashboard")
