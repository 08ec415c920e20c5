"""HTTP client commands: ``ldreg submit``, ``jobs``, ``status``, ``watch``, ``metrics``,
``cancel``, ``retry``, ``download``, ``diagnose``, ``compare``.

Built on ``client.LDRegClient``; the server and key come from ``--url`` / ``--api-key``
or ``LDREG_URL`` / ``LDREG_API_KEY``. Any failure is ONE line on stderr and a non-zero
exit status: 1 when the API refused or a job did not succeed, 2 for bad local input
(a missing key or spec file), 3 when the server could not be reached or a wait timed out.
No torch here: these commands must start instantly on a laptop.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from cli.common import fail, read_mapping
from client import (
    DEFAULT_URL,
    ApiError,
    ClientError,
    Job,
    JobTimeout,
    LDRegClient,
    MetricPoint,
    MissingApiKey,
    ServiceUnreachable,
)

# Metrics shown by `watch` and `status`, in this order (docs/science.md's names).
KEY_METRICS = (
    "loss",
    "ssl_loss",
    "ldreg_loss",
    "lid_gmean_k32",
    "lid_gmean_k512",
    "effective_rank",
    "knn_acc",
    "online_probe_acc",
    "linear_probe_acc",
    "ldreg_lid_gmean",
)

Url = Annotated[
    str, typer.Option("--url", envvar="LDREG_URL", help="API base URL", show_envvar=True)
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="LDREG_API_KEY", help="team API key", show_default=False),
]
DISTANCE_KEYS = ("gmean_baseline", "gmean", "fisher_rao", "log_ratio", "wasserstein_log_lid")
JobArg = Annotated[str, typer.Argument(help="job id", show_default=False)]

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


@contextmanager
def _api(url: str, api_key: str | None) -> Iterator[LDRegClient]:
    """The client, with every client-side failure turned into one stderr line."""
    try:
        if not api_key:
            raise MissingApiKey(
                "no API key: pass --api-key or set LDREG_API_KEY "
                "(`ldreg admin create-team NAME` prints a new team's key)"
            )
        with LDRegClient(url, api_key) as api:
            yield api
    except MissingApiKey as exc:
        fail(str(exc), 2)
    except ApiError as exc:
        field = f" [field: {exc.field}]" if exc.field else ""
        fail(f"{exc.message}{field} (HTTP {exc.status} {exc.code})")
    except (ServiceUnreachable, JobTimeout) as exc:
        fail(str(exc), 3)
    except ClientError as exc:
        fail(str(exc))


# Formatting ---------------------------------------------------------------------------


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _fmt_time(at: datetime | None) -> str:
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if at else "-"


def _ldreg_label(job: Job) -> str:
    if job.ldreg_on is None:
        return "-"
    if not job.ldreg_on:
        return "off"
    alpha = (job.spec.get("ldreg") or {}).get("alpha")
    return "on" if alpha is None else f"α={alpha:g}"


def _progress_text(job: Job) -> str:
    p = job.progress
    return f"{p.epoch}/{p.epochs}" if p.epochs else "-"


def _latest(series: dict[str, list[MetricPoint]]) -> dict[str, MetricPoint]:
    return {name: max(points, key=lambda p: p.step) for name, points in series.items() if points}


def _metrics_line(latest: dict[str, MetricPoint]) -> str:
    names = [n for n in KEY_METRICS if n in latest]
    return "  ".join(f"{n}={_fmt_value(latest[n].value)}" for n in names)


def _eta_seconds(job: Job, series: dict[str, list[MetricPoint]]) -> float | None:
    """Remaining epochs × mean past epoch duration (``epoch_seconds`` if reported)."""
    p = job.progress
    if not p.epochs or p.epoch <= 0 or p.epoch >= p.epochs:
        return None
    durations = [pt.value for pt in series.get("epoch_seconds", [])]
    if durations:
        per_epoch = sum(durations) / len(durations)
    elif job.started_at is not None:
        per_epoch = (datetime.now(UTC) - job.started_at).total_seconds() / p.epoch
    else:
        return None
    return per_epoch * (p.epochs - p.epoch)


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _print_job(job: Job) -> None:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("id", job.id)
    table.add_row("name", job.name or "-")
    table.add_row("kind", job.kind)
    if job.kind == "pretrain":
        table.add_row("method", f"{job.method or '-'}  (LDReg {_ldreg_label(job)})")
    table.add_row("state", job.state)
    table.add_row("attempt", str(job.attempt))
    table.add_row("progress", f"epoch {_progress_text(job)}" if job.progress.epochs else "-")
    table.add_row("created", _fmt_time(job.created_at))
    table.add_row("started", _fmt_time(job.started_at))
    table.add_row("finished", _fmt_time(job.finished_at))
    if job.error is not None:
        table.add_row("error", f"[red]{job.error.code}: {job.error.message}[/red]")
    out.print(table)
    if job.summary:
        _print_summary(job.summary)


def _print_summary(summary: dict[str, Any]) -> None:
    """A diagnose summary's LID table (geometric mean and local-collapse fraction per
    estimator and k), then every other final value, nested ones flattened."""
    lid = summary.get("lid_gmean")
    collapse = summary.get("collapse_fraction") or {}
    if isinstance(lid, dict) and lid:
        ks = sorted({k for per_k in lid.values() for k in per_k}, key=int)
        table = Table(title="geometric-mean LID (collapsed: share of points below gmean/e)")
        table.add_column("estimator")
        for k in ks:
            table.add_column(f"k={k}", justify="right")
            table.add_column(f"collapsed k={k}", justify="right")
        for estimator, per_k in lid.items():
            cells = []
            for k in ks:
                cells.append(_fmt_value(per_k.get(k, "-")))
                fraction = (collapse.get(estimator) or {}).get(k)
                cells.append(f"{100 * fraction:.2f}%" if isinstance(fraction, float | int) else "-")
            table.add_row(estimator, *cells)
        out.print(table)
    rest = Table.grid(padding=(0, 2))
    rest.add_column(style="bold")
    rest.add_column()
    for key, value in summary.items():
        if key in ("lid_gmean", "collapse_fraction", "per_class"):
            continue
        if isinstance(value, dict):
            text = " ".join(f"{path}={_fmt_value(v)}" for path, v in _flatten(value))
            value = text if len(text) <= 120 else text[:117] + "..."
        elif isinstance(value, list):
            value = json.dumps(value)
        rest.add_row(key, _fmt_value(value))
    if rest.row_count:
        out.print(rest)


def _flatten(value: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, item in value.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(item, dict):
            yield from _flatten(item, path)
        else:
            yield path, item


def _load_spec(path: Path, kind: str | None) -> tuple[str, dict[str, Any], str | None]:
    """A spec file: the spec itself, or ``{kind, name, spec}``. YAML or JSON."""
    doc = read_mapping(path)
    name = None
    if isinstance(doc.get("spec"), dict):
        kind = kind or doc.get("kind")
        name = doc.get("name")
        doc = doc["spec"]
    kind = kind or ("diagnose" if "source" in doc else "pretrain")
    return kind, doc, name


def _watch(api: LDRegClient, job_id: str, interval: float) -> Job:
    """A live progress bar (epoch/epochs) with the latest metrics, until the job ends."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[epochs]}"),
        TextColumn("ETA {task.fields[eta]}"),
        console=out,
    )
    task = progress.add_task("queued", total=None, eta="-", epochs="")
    series: dict[str, list[MetricPoint]] = {}
    last_step: int | None = None

    with Live(Group(progress, ""), console=out, refresh_per_second=4, transient=False) as live:
        while True:
            job = api.job(job_id)
            for name, points in api.metrics(job_id, since=last_step).items():
                series.setdefault(name, []).extend(points)
            steps = [p.step for pts in series.values() for p in pts]
            last_step = max(steps) if steps else None
            progress.update(
                task,
                description=f"{job.name or job.id[:12]} {job.state}",
                # Without epochs (a diagnosis): the share of points done once the
                # worker reports it, a pulsing bar before that.
                completed=job.progress.epoch if job.progress.epochs else job.progress.done,
                total=job.progress.epochs
                or (1 if job.finished or job.progress.fraction is not None else None),
                eta=_fmt_duration(_eta_seconds(job, series)),
                epochs=f"epoch {_progress_text(job)}" if job.progress.epochs else "",
            )
            live.update(Group(progress, _metrics_line(_latest(series)) or "waiting for metrics"))
            if job.finished:
                break
            time.sleep(interval)
    return job


def _finish(job: Job) -> None:
    """Report a finished job; non-zero exit unless it succeeded."""
    if job.state == "succeeded":
        err.print(f"job {job.id} succeeded")
        return
    reason = f": {job.error.code}: {job.error.message}" if job.error else ""
    fail(f"job {job.id} {job.state}{reason}")


# Commands -----------------------------------------------------------------------------


def submit(
    spec_file: Annotated[Path, typer.Argument(help="job spec (YAML or JSON)")],
    wait: Annotated[bool, typer.Option("--wait", help="watch the job until it ends")] = False,
    name: Annotated[str | None, typer.Option("--name", help="a name for the job")] = None,
    kind: Annotated[
        str | None, typer.Option("--kind", help="pretrain | diagnose (default: from the spec)")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option("--idempotency-key", help="resubmitting returns the same job")
    ] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Submit a job; prints its id (and with --wait, watches it to the end)."""
    kind, spec, file_name = _load_spec(spec_file, kind)
    with _api(url, api_key) as api:
        job = api.submit(kind, spec, name=name or file_name, idempotency_key=idempotency_key)
        err.print(f"submitted {job.kind} job {job.id} ({job.state})")
        print(job.id)
        if wait:
            _finish(_watch(api, job.id, interval=1.0))


def jobs(
    state: Annotated[str | None, typer.Option("--state", help="only jobs in this state")] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="pretrain | diagnose")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """The team's jobs, newest first."""
    with _api(url, api_key) as api:
        found = list(api.jobs(state=state, kind=kind, limit=limit))
    if as_json:
        for job in found:
            print(job.model_dump_json())
        return
    table = Table(box=None, pad_edge=False)
    table.add_column("ID", no_wrap=True, min_width=32)
    for col in ("NAME", "KIND", "METHOD", "LDREG", "STATE", "EPOCH", "CREATED"):
        table.add_column(col, no_wrap=True)
    for job in found:
        table.add_row(
            job.id,
            job.name or "-",
            job.kind,
            job.method or "-",
            _ldreg_label(job),
            job.state,
            _progress_text(job),
            _fmt_time(job.created_at),
        )
    # Piped output keeps whole ids on one line instead of rich's default 80 columns.
    (out if out.is_terminal else Console(width=200)).print(table)
    if not found:
        err.print("no jobs")


def status(
    job_id: JobArg,
    as_json: Annotated[bool, typer.Option("--json", help="the job's JSON")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """One job: state, attempt, progress, error and summary."""
    with _api(url, api_key) as api:
        job = api.job(job_id)
        latest = _latest(api.metrics(job_id)) if not as_json else {}
    if as_json:
        print(job.model_dump_json(indent=2))
        return
    _print_job(job)
    if latest:
        out.print(f"[bold]latest[/bold]  {_metrics_line(latest)}")


def watch(
    job_id: JobArg,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="seconds")] = 1.0,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Live progress bar and latest metrics until the job ends (exit 1 unless it succeeded)."""
    with _api(url, api_key) as api:
        _finish(_watch(api, job_id, interval))


def metrics(
    job_id: JobArg,
    as_csv: Annotated[
        bool, typer.Option("--csv", help="every point as CSV: series,epoch,step,value")
    ] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """A job's metrics: per-epoch table (last value of each epoch), or every point as CSV."""
    with _api(url, api_key) as api:
        series = api.metrics(job_id)
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["series", "epoch", "step", "value"])
        for name in sorted(series):
            for p in sorted(series[name], key=lambda p: p.step):
                writer.writerow([name, p.epoch, p.step, repr(p.value)])
        return
    if not series:
        err.print("no metrics yet")
        return
    names = [n for n in KEY_METRICS if n in series] + sorted(set(series) - set(KEY_METRICS))
    by_epoch: dict[int, dict[str, float]] = {}
    for name, points in series.items():
        for p in sorted(points, key=lambda p: p.step):
            by_epoch.setdefault(p.epoch, {})[name] = p.value
    # One row per series, the latest epochs as columns (as many as the terminal fits;
    # every point: --csv).
    console = out if out.is_terminal else Console(width=160)
    name_width = max(len(n) for n in names)
    fits = max(1, (console.width - name_width - 4) // 11)
    epochs = sorted(by_epoch)[-fits:]
    title = (
        None if len(epochs) == len(by_epoch) else f"last {len(epochs)} of {len(by_epoch)} epochs"
    )
    table = Table(title=title)
    table.add_column("series", no_wrap=True)
    for epoch in epochs:
        table.add_column(f"ep {epoch}", justify="right", no_wrap=True)
    for name in names:
        table.add_row(
            name, *[_fmt_value(by_epoch[e][name]) if name in by_epoch[e] else "" for e in epochs]
        )
    console.print(table)


def cancel(job_id: JobArg, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Ask a job to stop; a running job stops within a few steps."""
    with _api(url, api_key) as api:
        job = api.cancel(job_id)
    print(f"{job.id} {job.state}")


def retry(job_id: JobArg, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Resume a failed or cancelled job from its last checkpoint."""
    with _api(url, api_key) as api:
        job = api.retry(job_id)
    print(f"{job.id} {job.state}")


def download(
    job_id: JobArg,
    name: Annotated[str, typer.Argument(help="artifact name (see `ldreg status`)")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="file or folder (default: here)")
    ] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Download one of a job's artifacts (checkpoint, per-point LIDs, ...)."""
    with _api(url, api_key) as api:
        path = api.download(job_id, name, output)
    print(path)


def diagnose(
    embeddings: Annotated[Path, typer.Argument(help="embeddings, .npy (N, D) or .npz")],
    k: Annotated[list[int] | None, typer.Option("--k", help="neighbourhood size; repeat")] = None,
    estimator: Annotated[
        list[str] | None, typer.Option("--estimator", help="mle | mom | tle; repeat")
    ] = None,
    name: Annotated[str | None, typer.Option("--name")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="seconds to wait")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Upload embeddings, run a LID / collapse diagnosis on the service, print its summary."""
    if not embeddings.is_file():
        fail(f"embeddings file not found: {embeddings}", 2)
    spec: dict[str, Any] = {}
    if k:
        spec["k"] = k
    if estimator:
        spec["estimators"] = estimator
    with _api(url, api_key) as api:
        upload = api.upload(embeddings)
        spec["source"] = {"upload_id": upload.id}
        job = api.submit("diagnose", spec, name=name or embeddings.name)
        err.print(f"submitted diagnose job {job.id}")
        with err.status("diagnosing..."):
            job = api.wait(job.id, poll=0.5, timeout=timeout)
    if job.state != "succeeded":
        _finish(job)
    out.print(f"[bold]{job.id}[/bold]  {upload.n or '?'} points × {upload.d or '?'} dims")
    _print_summary(job.summary or {})


def compare(
    job_ids: Annotated[list[str], typer.Argument(help="two or more job ids")],
    as_json: Annotated[bool, typer.Option("--json", help="the API's JSON")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Two or more jobs side by side: spec differences and final metrics."""
    if len(job_ids) < 2:
        fail("compare needs at least two job ids", 2)
    with _api(url, api_key) as api:
        result = api.compare(job_ids)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    _print_comparison(result)


def _print_comparison(result: dict[str, Any]) -> None:
    """Jobs as columns (the first is the baseline), then each job's LID distances to it."""
    jobs_ = result.get("jobs") or []
    table = Table(title="first job = baseline")
    table.add_column("", style="bold")
    for j in jobs_:
        table.add_column(j.get("name") or j.get("id", "")[:12], justify="right")
    job_models = [Job.model_validate(j) for j in jobs_]
    table.add_row("id", *[j.id[:12] for j in job_models])
    table.add_row("state", *[j.state for j in job_models])
    table.add_row("kind", *[j.kind for j in job_models])
    table.add_row("method", *[j.method or "-" for j in job_models])
    table.add_row("LDReg", *[_ldreg_label(j) for j in job_models])
    finals = [_final_values(j) for j in jobs_]
    names = [n for n in KEY_METRICS if any(n in f for f in finals)]
    names += sorted({n for f in finals for n in f} - set(names) - {"epoch_seconds", "lr"})
    for name in names:
        table.add_row(name, *[_fmt_value(f[name]) if name in f else "" for f in finals])
    lid_keys = sorted(
        {(e, k) for j in jobs_ for e, by_k in (j.get("lid_gmean") or {}).items() for k in by_k},
        key=lambda ek: (ek[0], int(ek[1])),
    )
    for e, k in lid_keys:
        values = [((j.get("lid_gmean") or {}).get(e) or {}).get(k) for j in jobs_]
        table.add_row(f"LID {e} k={k}", *[_fmt_value(v) if v is not None else "" for v in values])
    out.print(table)

    rows = [(d["job_id"], x) for d in result.get("distances") or [] for x in d.get("lid") or []]
    if rows:
        names_by_id = {j.id: j.name or j.id[:12] for j in job_models}
        dist = Table(title="LID distances to the baseline")
        for col in ("job", "estimator", "k", "baseline", "LID", "Fisher-Rao", "ln ratio", "W1"):
            dist.add_column(col, justify="left" if col in ("job", "estimator") else "right")
        for job_id, x in rows:
            dist.add_row(
                names_by_id.get(job_id, job_id[:12]),
                x["estimator"],
                str(x["k"]),
                *[
                    _fmt_value(x.get(key)) if x.get(key) is not None else "-"
                    for key in DISTANCE_KEYS
                ],
            )
        out.print(dist)


def _final_values(job: dict[str, Any]) -> dict[str, Any]:
    """Final values of one job of a comparison: its summary's scalars (a diagnose
    summary's nested LID tables are shown apart)."""
    values: dict[str, Any] = {}
    for name, points in (job.get("series") or {}).items():
        if points:
            values[name] = max(points, key=lambda p: p.get("step", 0)).get("value")
    for name, value in (job.get("summary") or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            values[name] = value
    return values
