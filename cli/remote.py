"""HTTP client commands: ``ldreg submit``, ``jobs``, ``status``, ``watch``, ``logs``,
``metrics``, ``cancel``, ``retry``, ``artifacts``, ``download``, ``diagnose``, ``compare``,
``sweep``, ``report``.

Every JOB argument takes a job id or a unique prefix of at least 6 characters of one
(the API resolves it among the team's jobs).

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
import os
import re
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
    Artifact,
    ClientError,
    Comparison,
    Job,
    JobTimeout,
    LDRegClient,
    MetricPoint,
    MissingApiKey,
    ServiceUnreachable,
    apply_overrides,
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
JobArg = Annotated[
    str, typer.Argument(help="job id, or a unique prefix of 6+ characters", show_default=False)
]
# ldreg.train.STOP_POLL_STEPS (not imported: no torch here; tests/test_client_cli.py
# checks the two agree): a running job checks for a stop request every this many steps.
STOP_POLL_STEPS = 1

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
    if job.kind == "sweep":  # its children: finished of all
        return f"{p.epoch}/{p.epochs} children"
    return f"{p.epoch}/{p.epochs}" if p.epochs else "-"


def _position_text(job: Job) -> str:
    """Where a job is: its place in the queue, or the worker running it."""
    if job.state == "queued" and job.queue_position is not None:
        return f"#{job.queue_position} in queue"
    if job.state in ("running", "cancelling") and job.worker:
        return job.worker
    return "-"


def _step_text(job: Job) -> str:
    """``epoch 2/10 step 37/120`` (the epoch in progress) while a run reports steps,
    else the epochs finished; a diagnosis' share of points done; a sweep's children
    finished."""
    p = job.progress
    if job.kind == "sweep":
        return f"{p.epoch}/{p.epochs} children finished"
    in_epoch = p.epoch_step
    if job.state in ("running", "cancelling") and in_epoch is not None and p.epoch < p.epochs:
        step, steps = in_epoch
        return f"epoch {p.epoch + 1}/{p.epochs} step {step}/{steps}"
    if p.epochs:
        return f"epoch {p.epoch}/{p.epochs}"
    return f"{100 * p.fraction:.0f}% done" if p.fraction is not None else ""


def _server_eta(job: Job) -> float | None:
    """The worker's estimate, less the time since it made it."""
    p = job.progress
    if p.eta_seconds is None or job.state not in ("running", "cancelling"):
        return None
    if p.updated_at is None:
        return p.eta_seconds
    return max(0.0, p.eta_seconds - (datetime.now(UTC) - p.updated_at).total_seconds())


def _progress_line(job: Job, latest: dict[str, MetricPoint], eta: float | None) -> str:
    """One plain line: state, epoch/step, share done, images/s, ETA, latest metrics."""
    p = job.progress
    parts = [job.state, _step_text(job)]
    if p.epochs:  # (a diagnosis' share is in its step text)
        parts.append(f"{100 * p.done:.0f}%")
    if p.images_per_second is not None and job.state in ("running", "cancelling"):
        parts.append(f"{p.images_per_second:,.0f} img/s")
    if eta is not None and not job.finished:
        parts.append(f"ETA {_fmt_duration(eta)}")
    metrics_text = _metrics_line(latest)
    if metrics_text:
        parts.append(metrics_text)
    return "  ".join(part for part in parts if part)


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
    if job.parent_id:
        table.add_row("sweep", f"{job.parent_id}  (arm {job.sweep_arm}, seed {job.sweep_seed})")
    if job.kind == "pretrain":
        table.add_row("method", f"{job.method or '-'}  (LDReg {_ldreg_label(job)})")
    table.add_row("state", job.state)
    table.add_row("attempt", str(job.attempt))
    table.add_row("progress", _progress_line(job, {}, _server_eta(job)).partition("  ")[2] or "-")
    if job.worker and job.state in ("running", "cancelling"):
        table.add_row("worker", job.worker)
    table.add_row("created", _fmt_time(job.created_at))
    table.add_row("started", _fmt_time(job.started_at))
    table.add_row("finished", _fmt_time(job.finished_at))
    if job.error is not None:
        table.add_row("error", f"[red]{job.error.code}: {job.error.message}[/red]")
    out.print(table)
    if job.kind == "sweep":
        err.print(
            f"its children: ldreg jobs --parent {job.id[:8]}; its report: ldreg report {job.id[:8]}"
        )
    elif job.summary:
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
    if kind is None:
        kind = "pretrain"
        if "source" in doc:
            kind = "diagnose"
        elif "base" in doc and "seeds" in doc:  # docs/sweeps.md
            kind = "sweep"
    return kind, doc, name


def _updates(
    api: LDRegClient, job_id: str, interval: float
) -> Iterator[tuple[Job, dict[str, list[MetricPoint]]]]:
    """Each poll's job and every metric point so far, until (and including) the poll
    that finds it finished."""
    series: dict[str, list[MetricPoint]] = {}
    last_step: int | None = None
    while True:
        job = api.job(job_id)
        job_id = job.id  # a prefix is resolved once
        for name, points in api.metrics(job_id, since=last_step).items():
            series.setdefault(name, []).extend(points)
        steps = [p.step for pts in series.values() for p in pts]
        last_step = max(steps) if steps else None
        yield job, series
        if job.finished:
            return
        time.sleep(interval)


def _watch(api: LDRegClient, job_id: str, interval: float, console: Console | None = None) -> Job:
    """Follow the job until it ends: a live progress bar on a terminal, else one plain
    line per change (for logs and pipes)."""
    console = console or out
    if console.is_terminal:
        return _watch_live(api, job_id, interval, console)
    return _watch_lines(api, job_id, interval, console)


def _eta(job: Job, series: dict[str, list[MetricPoint]]) -> float | None:
    eta = _server_eta(job)
    return eta if eta is not None else _eta_seconds(job, series)


def _watch_lines(api: LDRegClient, job_id: str, interval: float, console: Console) -> Job:
    """One line, with the local time, whenever the job's state, progress or latest
    metrics change (never rich's control codes, which a file or pipe would keep)."""
    shown = None
    job = None
    for job, series in _updates(api, job_id, interval):
        latest = _latest(series)
        # The ETA counts down on its own: a new line only when something else changed.
        key = _progress_line(job, latest, None)
        if key != shown:
            shown = key
            line = _progress_line(job, latest, _eta(job, series))
            stamp = datetime.now().strftime("%H:%M:%S")
            console.file.write(f"{stamp} {job.name or job.id[:12]}  {line}\n")
            console.file.flush()
    assert job is not None
    return job


def _watch_live(api: LDRegClient, job_id: str, interval: float, console: Console) -> Job:
    """A live progress bar with the latest metrics: it moves with every step the worker
    reports (steps across epochs), the text saying which epoch and step."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[where]}"),
        TextColumn("{task.fields[speed]}"),
        TextColumn("ETA {task.fields[eta]}"),
        console=console,
    )
    task = progress.add_task("queued", total=None, eta="-", where="", speed="")
    job = None
    with Live(Group(progress, ""), console=console, refresh_per_second=4, transient=False) as live:
        for job, series in _updates(api, job_id, interval):
            p = job.progress
            total: float | None
            if p.steps and p.step is not None and not job.finished:
                completed, total = float(p.step), float(p.steps)
            elif p.epochs:
                completed, total = float(p.epoch), float(p.epochs)
            else:
                # A diagnosis: the share of points done once the worker reports it, a
                # pulsing bar before that.
                completed = p.done
                total = 1.0 if job.finished or p.fraction is not None else None
            running = job.state in ("running", "cancelling")
            progress.update(
                task,
                description=f"{job.name or job.id[:12]} {job.state}",
                completed=completed,
                total=total,
                eta=_fmt_duration(_eta(job, series)),
                where=_step_text(job),
                speed=f"{p.images_per_second:,.0f} img/s"
                if running and p.images_per_second is not None
                else "",
            )
            live.update(Group(progress, _metrics_line(_latest(series)) or "waiting for metrics"))
    assert job is not None
    return job


def _finish(job: Job) -> None:
    """Report a finished job; non-zero exit unless it succeeded."""
    if job.state == "succeeded":
        err.print(f"job {job.id} succeeded")
        return
    reason = f": {job.error.code}: {job.error.message}" if job.error else ""
    fail(f"job {job.id} {job.state}{reason}")


# Commands -----------------------------------------------------------------------------


def _parse_override(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` of ``--set``: a dotted field and a YAML value (numbers, true,
    null, [16, 32], or text). Exit 2 when it is not of that form."""
    import yaml

    path, sep, raw = text.partition("=")
    path = path.strip()
    if not sep or not path or not all(path.split(".")):
        fail(f"--set {text!r}: expected FIELD=VALUE, e.g. --set ldreg.alpha=0.05", 2)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "not a YAML value"
        fail(f"--set {text!r}: the value is not valid YAML ({problem}); quote text", 2)
    # YAML 1.1 reads 1e-5 (no dot) as text; in a spec it is always meant as a number.
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        value = float(value)
    return path, value


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def submit(
    spec_file: Annotated[
        Path | None,
        typer.Argument(help="job spec (YAML or JSON); or --from JOB", show_default=False),
    ] = None,
    from_job: Annotated[
        str | None,
        typer.Option("--from", help="start from this job's kind and spec (id or prefix)"),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="FIELD=VALUE: change one spec field, e.g. ldreg.alpha=0.05 or ldreg=null"
            " (a YAML value; repeat)",
        ),
    ] = None,
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
    """Submit a job from a spec file, or a copy of an earlier job (--from) with some
    fields changed (--set); prints its id (and with --wait, follows it to the end)."""
    if spec_file is not None and from_job is not None:
        fail("pick one: a spec file or --from JOB, not both", 2)
    if spec_file is None and from_job is None:
        fail("nothing to submit: pass a spec file, or --from JOB to copy a job's spec", 2)
    changes = [_parse_override(text) for text in overrides or []]
    file_name = None
    if spec_file is not None:
        kind, spec, file_name = _load_spec(spec_file, kind)
    with _api(url, api_key) as api:
        if from_job is not None:
            source = api.job(from_job)
            kind, spec = kind or source.kind, source.spec
        assert kind is not None
        spec = apply_overrides(spec, changes)
        job = api.submit(kind, spec, name=name or file_name, idempotency_key=idempotency_key)
        origin = f" from {source.id}" if from_job is not None else ""
        changed = ", ".join(text.strip() for text in overrides or [])
        err.print(
            f"submitted {job.kind} job {job.id} ({job.state}){origin}"
            + (f" with {changed}" if changed else ""),
            markup=False,
            highlight=False,
        )
        print(job.id, flush=True)
        if wait:
            # Progress on stderr: stdout stays the job's id, for $(ldreg submit ...).
            _finish(_watch(api, job.id, interval=1.0, console=err))


def jobs(
    state: Annotated[str | None, typer.Option("--state", help="only jobs in this state")] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="pretrain | diagnose | sweep")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    parent: Annotated[
        str | None, typer.Option("--parent", help="only the children of this sweep (id or prefix)")
    ] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """The team's jobs, newest first."""
    with _api(url, api_key) as api:
        found = list(api.jobs(state=state, kind=kind, limit=limit, parent=parent))
    if as_json:
        for job in found:
            print(job.model_dump_json())
        return
    table = Table(box=None, pad_edge=False)
    table.add_column("ID", no_wrap=True, min_width=32)
    for col in ("NAME", "KIND", "METHOD", "LDREG", "STATE", "EPOCH", "QUEUE/WORKER", "CREATED"):
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
            _position_text(job),
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


def logs(
    job_id: JobArg,
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="keep printing new lines until the job ends")
    ] = False,
    attempt: Annotated[
        int | None, typer.Option("--attempt", min=1, help="this attempt's log (default: latest)")
    ] = None,
    tail: Annotated[
        int | None, typer.Option("--tail", "-n", min=0, help="only the last N lines first")
    ] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """A job's log (the worker's lines for it, its stdout and stderr); -f follows it
    live until the job ends (Ctrl-C stops following, the job runs on)."""
    with _api(url, api_key) as api:
        if not follow:
            sys.stdout.write(api.logs(job_id, attempt=attempt, tail=tail))
            sys.stdout.flush()
            return
        lines = api.logs(job_id, follow=True, attempt=attempt, tail=tail)
        try:
            for line in lines:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        except KeyboardInterrupt:
            lines.close()
            raise typer.Exit(130) from None
        except BrokenPipeError:  # `ldreg logs -f JOB | head`: the reader has gone
            lines.close()
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None
        job = api.job(job_id)
        err.print(f"job {job.id} {job.state}")


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
    """Ask a job to stop: a queued job ends at once; a running one once its worker has
    seen the request (next heartbeat) and finished its current training step."""
    with _api(url, api_key) as api:
        job = api.cancel(job_id)
    print(f"{job.id} {job.state}")
    err.print(_cancel_note(job), markup=False, highlight=False)


def _cancel_note(job: Job) -> str:
    """What happens next, and roughly when."""
    if job.state == "cancelled":
        return f"job {job.id} had not started: cancelled at once"
    p = job.progress
    batch = job.spec.get("batch_size")
    steps = "step" if STOP_POLL_STEPS == 1 else f"{STOP_POLL_STEPS} steps"
    when = f"at the end of its current training {steps} after that"
    if p.images_per_second and isinstance(batch, int) and batch > 0:
        when += f" (~{STOP_POLL_STEPS * batch / p.images_per_second:.1f}s at its current speed)"
    return (
        f"job {job.id} is stopping: its worker sees the request at its next heartbeat"
        f" (every few seconds) and stops {when}; an evaluation already under way"
        f" finishes first. `ldreg watch {job.id[:8]}` follows it to 'cancelled'"
    )


def retry(job_id: JobArg, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Resume a failed or cancelled job from its last checkpoint."""
    with _api(url, api_key) as api:
        job = api.retry(job_id)
    print(f"{job.id} {job.state}")


def _fmt_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # unreachable; for the type checker


def _print_artifacts(artifacts: list[Artifact]) -> None:
    table = Table(box=None, pad_edge=False)
    table.add_column("NAME", no_wrap=True)
    table.add_column("SIZE", justify="right", no_wrap=True)
    table.add_column("CREATED", no_wrap=True)
    for artifact in artifacts:
        table.add_row(artifact.name, _fmt_size(artifact.size), _fmt_time(artifact.created_at))
    (out if out.is_terminal else Console(width=200)).print(table)


def artifacts(
    job_id: JobArg,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """A job's artifacts (checkpoints, the backbone, per-point LIDs, logs): name, size,
    created."""
    with _api(url, api_key) as api:
        found = api.artifacts(job_id)
    if as_json:
        for artifact in found:
            print(artifact.model_dump_json())
        return
    if not found:
        err.print("no artifacts (yet)")
        return
    _print_artifacts(found)


def download(
    job_id: JobArg,
    name: Annotated[
        str | None,
        typer.Argument(help="artifact name; without it, list them", show_default=False),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--output",
            help="a file, a folder (existing, or ending in /) to put it in under its own"
            " name, or - for stdout (default: here)",
        ),
    ] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Download one of a job's artifacts (checkpoint, per-point LIDs, ...); prints where
    it went. Without a NAME: what there is to download."""
    with _api(url, api_key) as api:
        if name is None:
            found = api.artifacts(job_id)
            if not found:
                err.print("no artifacts (yet)")
                return
            _print_artifacts(found)
            err.print("download one: ldreg download JOB NAME [-o FILE|DIR/|-]")
            return
        if output == "-":
            api.stream_artifact(job_id, name, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        try:
            path = api.download(job_id, name, output)
        except OSError as exc:
            fail(f"cannot write {output or name}: {exc.strerror or exc}", 2)
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
    job_ids: Annotated[
        list[str],
        typer.Argument(help="two or more job ids (or prefixes); the first is the baseline"),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="the API's JSON")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Two or more jobs side by side: first the spec fields that differ, then final
    metrics (latest ones, marked, for a job still running) and LID distances."""
    if len(job_ids) < 2:
        fail("compare needs at least two job ids", 2)
    with _api(url, api_key) as api:
        result = api.compare(job_ids)
    if as_json:
        print(result.model_dump_json(indent=2))
        return
    _print_comparison(result)


def _spec_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value)


def _job_label(job: Job) -> str:
    return job.name or job.id[:12]


def _as_of(job: Any) -> str:
    """Whether a compared job's values are final, or as of which epoch/step."""
    m = job.metrics
    if m.final:
        return f"final ({job.state})"
    if m.as_of_step is None:
        return f"{job.state}, no metrics yet"
    return f"{job.state}: as of epoch {m.as_of_epoch}, step {m.as_of_step}"


def _print_comparison(result: Comparison) -> None:
    """The spec fields that differ, then jobs as columns (the first is the baseline)
    with their metrics, then each job's LID distances to the baseline."""
    jobs_ = result.jobs
    labels = [_job_label(j) for j in jobs_]
    if result.spec_diff:
        diff = Table(title="spec differences")
        diff.add_column("field", style="bold", no_wrap=True)
        for label in labels:
            diff.add_column(label)
        for d in result.spec_diff:
            diff.add_row(d.field, *[_spec_value(v) for v in d.values])
        out.print(diff)
    else:
        out.print("specs: identical")

    table = Table(title="first job = baseline")
    table.add_column("", style="bold")
    for label in labels:
        table.add_column(label, justify="right")
    table.add_row("id", *[j.id[:12] for j in jobs_])
    table.add_row("state", *[j.state for j in jobs_])
    table.add_row("kind", *[j.kind for j in jobs_])
    table.add_row("method", *[j.method or "-" for j in jobs_])
    table.add_row("LDReg", *[_ldreg_label(j) for j in jobs_])
    table.add_row("metrics", *[_as_of(j) for j in jobs_])
    finals = [j.metrics.values for j in jobs_]
    names = [n for n in KEY_METRICS if any(n in f for f in finals)]
    names += sorted({n for f in finals for n in f} - set(names) - {"epoch_seconds", "lr"})
    for name in names:
        table.add_row(name, *[_fmt_value(f[name]) if name in f else "" for f in finals])
    lid_keys = sorted(
        {(e, k) for j in jobs_ for e, by_k in j.lid_gmean.items() for k in by_k},
        key=lambda ek: (ek[0], int(ek[1])),
    )
    for e, k in lid_keys:
        values = [(j.lid_gmean.get(e) or {}).get(k) for j in jobs_]
        table.add_row(f"LID {e} k={k}", *[_fmt_value(v) if v is not None else "" for v in values])
    out.print(table)

    rows = [(d["job_id"], x) for d in result.distances for x in d.get("lid") or []]
    if rows:
        names_by_id = {j.id: _job_label(j) for j in jobs_}
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


# Sweeps (docs/sweeps.md) ------------------------------------------------------------


def sweep(
    spec_file: Annotated[
        Path, typer.Argument(help="sweep spec (YAML or JSON): base, grid, seeds, ...")
    ],
    wait: Annotated[
        bool, typer.Option("--wait", help="follow it until every child has finished")
    ] = False,
    name: Annotated[str | None, typer.Option("--name", help="a name for the sweep")] = None,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="seconds between polls (--wait)")
    ] = 2.0,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Submit a sweep: one pretrain job per arm and seed, and a report with a verdict
    per arm and metric. Prints its id (on stdout) and its children; with --wait, follows
    it to the end and prints the report (exit 1 unless it succeeded)."""
    _, spec, file_name = _load_spec(spec_file, "sweep")
    with _api(url, api_key) as api:
        job = api.submit("sweep", spec, name=name or file_name)
        seeds = len(job.spec.get("seeds") or []) or 1
        children = job.children or 0
        err.print(
            f"submitted sweep {job.id} ({job.state}): {children} children,"
            f" {children // seeds} arms × {seeds} seeds"
            f" (ldreg jobs --parent {job.id[:8]}; ldreg report {job.id[:8]})",
            markup=False,
            highlight=False,
        )
        print(job.id, flush=True)
        if not wait:
            return
        job = _wait_sweep(api, job.id, interval)
        report_ = api.report(job.id)
    _print_report(job, report_)
    if job.state != "succeeded":
        _finish(job)


def _wait_sweep(api: LDRegClient, job_id: str, interval: float) -> Job:
    """Poll the sweep until it has finished; a line on stderr whenever its children's
    states change."""
    shown = None
    while True:
        job = api.job(job_id)
        counts: dict[str, int] = {}
        for child in api.jobs(parent=job.id):
            counts[child.state] = counts.get(child.state, 0) + 1
        order = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")
        states = sorted(counts, key=lambda s: order.index(s) if s in order else len(order))
        line = f"{job.state}  " + ", ".join(f"{counts[state]} {state}" for state in states)
        if line != shown:
            shown = line
            stamp = datetime.now().strftime("%H:%M:%S")
            err.print(f"{stamp} {job.name or job.id[:12]}  {line}", markup=False, highlight=False)
        if job.finished:
            return job
        time.sleep(interval)


def report(
    job_id: JobArg,
    as_json: Annotated[bool, typer.Option("--json", help="the API's JSON")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """A sweep's report: per arm and metric, the effect against the baseline with its
    interval, the verdict and the seeds needed; the noise floor; failed children. While
    children run, the verdicts so far."""
    with _api(url, api_key) as api:
        job = api.job(job_id)
        found = api.report(job.id)
    if as_json:
        print(json.dumps(found, indent=2))
        return
    _print_report(job, found)


def _fmt_ci(ci: list[float | None] | None) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "-"
    return f"[{_fmt_value(ci[0])}, {_fmt_value(ci[1])}]"


def _fmt_signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4g}"


def _print_report(job: Job, found: dict[str, Any]) -> None:
    """The report as tables: arm × metric (the arm's own mean, its effect against the
    baseline with the interval, verdict, beyond the noise floor, seeds needed), the
    noise floor per metric, the failed children, the notes."""
    children = found.get("children") or {}
    by_state = ", ".join(f"{n} {s}" for s, n in (children.get("by_state") or {}).items())
    status = "complete" if found.get("complete") else "incomplete: the verdicts so far"
    out.print(
        f"[bold]sweep {job.name or job.id}[/bold]  {job.state}  {status}"
        f"  ({children.get('expected', '?')} children: {by_state or 'none reported'})",
        highlight=False,
    )
    confidence = found.get("confidence", 0.95)
    table = Table(title=f"effect = arm − baseline, paired by seed; {confidence:.0%} interval")
    for col in ("arm", "metric", "n", "mean", "effect", "interval", "verdict", "beyond noise"):
        table.add_column(col, justify="right" if col in ("n", "mean", "effect") else "left")
    table.add_column("seeds needed", justify="right")
    directions = found.get("directions") or {}
    for arm in found.get("arms") or []:
        for metric in found.get("metrics") or []:
            own = (arm.get("metrics") or {}).get(metric) or {}
            effect = (arm.get("effects") or {}).get(metric)
            beyond = "-"
            if effect and effect.get("beyond_noise_floor") is not None:
                beyond = "yes" if effect["beyond_noise_floor"] else "no"
            table.add_row(
                arm["name"],
                f"{metric} ({directions.get(metric, 'higher')})",
                str(effect["n"] if effect else own.get("n", 0)),
                _fmt_value(own["mean"]) if own.get("mean") is not None else "-",
                _fmt_signed(effect.get("effect")) if effect else "-",
                _fmt_ci(effect.get("ci")) if effect else _fmt_ci(own.get("ci")),
                effect["verdict"] if effect else f"{arm['role']}: interval of its mean",
                beyond,
                str(effect.get("seeds_needed") or "-") if effect else "-",
            )
    console = out if out.is_terminal else Console(width=200)
    console.print(table)
    floor = found.get("noise_floor")
    if floor:
        for metric, f in floor.items():
            reach = "-"
            if f.get("ci") and None not in f["ci"]:
                reach = f"±{_fmt_value(max(abs(f['ci'][0]), abs(f['ci'][1])))}"
            out.print(
                f"noise floor {metric}: {reach} (control − baseline"
                f" {_fmt_signed(f.get('effect'))} {_fmt_ci(f.get('ci'))}, {f.get('n', 0)} seeds)",
                highlight=False,
            )
    elif found.get("baseline"):
        out.print("noise floor: none (the control arm is off)", highlight=False)
    failed = [(arm["name"], c) for arm in found.get("arms") or [] for c in arm.get("failed") or []]
    if failed:
        ftable = Table(title="failed or cancelled children (left out of the pairing)")
        for col in ("arm", "seed", "state", "job", "error"):
            ftable.add_column(col)
        for name, c in failed:
            error = c.get("error") or {}
            text = f"{error.get('code')}: {error.get('message')}" if error else "-"
            ftable.add_row(name, str(c["seed"]), c["state"], c.get("job_id") or "-", text)
        console.print(ftable)
    for note in found.get("notes") or []:
        out.print(f"note: {note}", highlight=False)
