"""``LDRegClient``: the HTTP API v1 as typed Python calls (httpx, no torch).

from client import LDRegClient

with LDRegClient() as api:                     # LDREG_URL, LDREG_API_KEY
    job = api.submit("pretrain", {"method": "simclr", "epochs": 20})
    job = api.wait(job.id)
    print(job.state, api.metrics(job.id)["knn_acc"][-1].value)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal, overload

import httpx

from client.errors import ApiError, JobTimeout, MissingApiKey, ServiceUnreachable
from client.models import Artifact, Comparison, Event, Job, MetricPoint, Upload

DEFAULT_URL = "http://127.0.0.1:8000"
PAGE_SIZE = 100
# While waiting, a restarting API or database (502/503/504, no answer) is not the job
# failing: keep polling until the caller's timeout.
TRANSIENT_STATUSES = frozenset({502, 503, 504})


class LDRegClient:
    """A team's session with the LDReg service.

    ``url`` and ``api_key`` default to ``LDREG_URL`` (else http://127.0.0.1:8000) and
    ``LDREG_API_KEY``. Every error status the API answers with raises ``ApiError``;
    no answer at all raises ``ServiceUnreachable``. Wherever a method takes a
    ``job_id``, a unique prefix of at least 6 characters of one of the team's job ids
    does too (an ambiguous one is a 409 ``ApiError``, a shorter one a 422).
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get("LDREG_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("LDREG_API_KEY")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> LDRegClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # Jobs ---------------------------------------------------------------------

    def submit(
        self,
        kind: str,
        spec: Mapping[str, Any],
        name: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Submit a ``pretrain``, ``diagnose`` or ``sweep`` job (a sweep: its spec is a
        sweep spec, docs/sweeps.md; the job returned is the sweep, its children are
        ``jobs(parent=...)``); a bad spec raises a 422 ``ApiError`` naming the field.
        With ``idempotency_key`` a repeated call returns the same job."""
        body: dict[str, Any] = {"kind": kind, "spec": dict(spec)}
        if name is not None:
            body["name"] = name
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return Job.model_validate(self._json("POST", "/v1/jobs", json=body, headers=headers))

    def jobs(
        self,
        *,
        state: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        page_size: int = PAGE_SIZE,
        parent: str | None = None,
    ) -> Iterator[Job]:
        """The team's jobs, newest first, following the cursor across pages of
        ``page_size``; at most ``limit`` jobs when given; with ``parent`` (a sweep's
        id), only that sweep's children."""
        params: dict[str, Any] = {"limit": min(limit or page_size, page_size)}
        if state:
            params["state"] = state
        if kind:
            params["kind"] = kind
        if parent:
            params["parent"] = parent
        seen = 0
        while True:
            body = self._json("GET", "/v1/jobs", params=params)
            items, cursor = _page(body)
            for item in items:
                yield Job.model_validate(item)
                seen += 1
                if limit is not None and seen >= limit:
                    return
            if not cursor or not items:
                return
            params["cursor"] = cursor

    def job(self, job_id: str) -> Job:
        return Job.model_validate(self._json("GET", f"/v1/jobs/{job_id}"))

    def metrics(self, job_id: str, since: int | None = None) -> dict[str, list[MetricPoint]]:
        """Every series of the job: ``{name: [MetricPoint(epoch, step, value), ...]}``;
        with ``since``, only points at a global step after it."""
        params = {"since": since} if since is not None else None
        body = self._json("GET", f"/v1/jobs/{job_id}/metrics", params=params)
        series = {
            name: [MetricPoint.model_validate(p) for p in points]
            for name, points in (body.get("series") or {}).items()
        }
        if since is not None:  # also correct against a server that ignores the filter
            series = {n: [p for p in pts if p.step > since] for n, pts in series.items()}
        return series

    def events(self, job_id: str) -> list[Event]:
        """State transitions, oldest first, with the attempt and the reason of each."""
        body = self._json("GET", f"/v1/jobs/{job_id}/events")
        return [Event.model_validate(e) for e in _items(body, "events")]

    @overload
    def logs(
        self,
        job_id: str,
        follow: Literal[False] = False,
        attempt: int | None = None,
        *,
        tail: int | None = None,
    ) -> str: ...

    @overload
    def logs(
        self,
        job_id: str,
        follow: Literal[True],
        attempt: int | None = None,
        *,
        tail: int | None = None,
    ) -> Generator[str, None, None]: ...

    def logs(
        self,
        job_id: str,
        follow: bool = False,
        attempt: int | None = None,
        *,
        tail: int | None = None,
    ) -> str | Generator[str, None, None]:
        """An attempt's log (the latest attempt's unless ``attempt``): the worker's log
        lines for the job and its stdout and stderr.

        Without ``follow``, the whole log as it is now, as one string. With
        ``follow=True``, an iterator of its lines (without their newlines), old ones
        first, then new ones as they are written, that ends once the job has finished
        (for an explicit ``attempt``, once that attempt is over). Following the latest
        attempt goes on to the next one when the job is retried or resumed, after a line
        ``==> attempt N <==``. ``tail`` keeps only the last lines that were there."""
        if not self.api_key:
            raise MissingApiKey(
                "no API key: pass LDRegClient(api_key=...) or set the LDREG_API_KEY"
                " environment variable"
            )
        params: dict[str, Any] = {}
        if attempt is not None:
            params["attempt"] = attempt
        if tail is not None:
            params["tail"] = tail
        if follow:
            return self._follow_logs(job_id, params)
        parts: list[bytes] = []
        while True:
            response = self._request("GET", f"/v1/jobs/{job_id}/logs", params=params)
            parts.append(response.content)
            offset = int(response.headers.get("X-Log-Offset", 0))
            size = int(response.headers.get("X-Log-Size", 0))
            if offset >= size or not response.content:
                return b"".join(parts).decode("utf-8", errors="replace")
            # More than one read's worth: go on from where this one ended, same attempt.
            params.update(since=offset, attempt=int(response.headers["X-Log-Attempt"]))
            params.pop("tail", None)

    def _follow_logs(self, job_id: str, params: dict[str, Any]) -> Generator[str, None, None]:
        # No read timeout: a followed log may be quiet for long (a queued job, a slow
        # evaluation).
        timeout = httpx.Timeout(self._http.timeout.connect, read=None)
        path = f"/v1/jobs/{job_id}/logs"
        try:
            with self._http.stream(
                "GET", path, params={**params, "follow": "true"}, timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError.from_response(response)
                yield from response.iter_lines()
        except httpx.TransportError as exc:
            raise ServiceUnreachable(f"the log stream from {self.url} broke: {exc}") from exc

    def cancel(self, job_id: str) -> Job:
        """Ask a queued or running job to stop (cooperative); 409 once it has finished."""
        return Job.model_validate(self._json("POST", f"/v1/jobs/{job_id}/cancel"))

    def retry(self, job_id: str) -> Job:
        """Resume a failed or cancelled job from its last checkpoint (a finished sweep:
        its failed and cancelled children)."""
        return Job.model_validate(self._json("POST", f"/v1/jobs/{job_id}/retry"))

    def report(self, job_id: str) -> dict[str, Any]:
        """A sweep's report (docs/sweeps.md, "Reading a report"): per arm and metric the
        effect against the baseline with its interval, the verdict and the seeds
        needed; the noise floor; failed children. While children run, the verdicts so
        far (``report["complete"]`` is False). A 409 ``ApiError`` for a job that is not
        a sweep."""
        return dict(self._json("GET", f"/v1/jobs/{job_id}/report"))

    def workers(self) -> list[dict[str, Any]]:
        """Live workers: capacity, busy/idle, and which of your jobs runs where
        (``GET /v1/workers``; other teams' jobs are only counted)."""
        return list(self._json("GET", "/v1/workers")["workers"])

    def queue(self) -> dict[str, Any]:
        """Your queued jobs in start order, with position, reason and estimated start
        (``GET /v1/queue``)."""
        return dict(self._json("GET", "/v1/queue"))

    def artifacts(self, job_id: str) -> list[Artifact]:
        body = self._json("GET", f"/v1/jobs/{job_id}/artifacts")
        return [Artifact.model_validate(a) for a in _items(body, "artifacts")]

    def download(self, job_id: str, name: str, dest: str | Path | None = None) -> Path:
        """Stream artifact ``name`` to ``dest`` and return the file's path.

        ``dest`` is a file, or a folder to put it in under the artifact's own name: an
        existing folder, or a path ending in ``/`` (created when missing); the current
        folder by default. Written to a temporary name first, so a broken transfer
        never leaves a truncated file under the final name."""
        folder = dest is None or str(dest).endswith(("/", os.sep))
        path = Path(dest) if dest is not None else Path.cwd()
        if folder:
            path.mkdir(parents=True, exist_ok=True)
        target = path / Path(name).name if folder or path.is_dir() else path
        partial = target.with_name(target.name + ".part")
        try:
            with open(partial, "wb") as out:
                self.stream_artifact(job_id, name, out)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)
        return target

    def stream_artifact(self, job_id: str, name: str, out: BinaryIO) -> int:
        """Write artifact ``name``'s bytes to the binary file object ``out`` as they
        arrive (e.g. ``sys.stdout.buffer``); returns the number of bytes written."""
        written = 0
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError.from_response(response)
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
                    written += len(chunk)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(f"transfer from {self.url} failed: {exc}") from exc
        return written

    def upload(self, path: str | Path) -> Upload:
        """Upload embeddings (.npy / .npz) for a diagnose job."""
        path = Path(path)
        with open(path, "rb") as f:
            files = {"file": (path.name, f, "application/octet-stream")}
            return Upload.model_validate(self._json("POST", "/v1/uploads", files=files))

    def compare(self, job_ids: Sequence[str]) -> Comparison:
        """Two or more jobs side by side (``GET /v1/compare?jobs=A,B``): the spec fields
        that differ, each job's final (or, while it runs, latest) metrics, and LID
        distances to the first job."""
        body = self._json("GET", "/v1/compare", params={"jobs": ",".join(job_ids)})
        return Comparison.model_validate(body)

    def wait(
        self,
        job_id: str,
        *,
        poll: float = 2.0,
        timeout: float | None = None,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll until the job has finished (succeeded, failed or cancelled) and return
        it; ``JobTimeout`` after ``timeout`` seconds. ``on_update`` sees every poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                job = self.job(job_id)
            except ServiceUnreachable:
                job = None
            except ApiError as exc:
                if exc.status not in TRANSIENT_STATUSES:
                    raise
                job = None
            if job is not None:
                if on_update is not None:
                    on_update(job)
                if job.finished:
                    return job
            if deadline is not None and time.monotonic() >= deadline:
                state = job.state if job is not None else "unknown"
                raise JobTimeout(f"job {job_id} still {state} after {timeout:g}s")
            time.sleep(
                poll if deadline is None else min(poll, max(0.0, deadline - time.monotonic()))
            )

    # Service ------------------------------------------------------------------

    def healthz(self) -> dict[str, Any]:
        return self._json("GET", "/healthz", authenticated=False)

    # Plumbing -----------------------------------------------------------------

    def _json(self, method: str, path: str, *, authenticated: bool = True, **kwargs: Any) -> Any:
        if authenticated and not self.api_key:
            raise MissingApiKey(
                "no API key: pass LDRegClient(api_key=...) or set the LDREG_API_KEY"
                " environment variable"
            )
        response = self._request(method, path, **kwargs)
        if not response.content:
            return {}
        return response.json()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The response to a request; ``ApiError`` for an error status,
        ``ServiceUnreachable`` when there was no answer."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(f"cannot reach the LDReg API at {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return response


def _items(body: Any, key: str) -> list[Any]:
    """A list body, or the list under ``key`` / ``items`` of an object body."""
    if isinstance(body, list):
        return body
    for k in (key, "items", "data"):
        if isinstance(body.get(k), list):
            return body[k]
    return []


def _page(body: Any) -> tuple[list[Any], str | None]:
    """Items and the next page's cursor of a ``GET /v1/jobs`` answer."""
    items = _items(body, "jobs")
    cursor = None
    if isinstance(body, dict):
        cursor = body.get("next_cursor") or body.get("cursor") or body.get("next")
    return items, cursor
