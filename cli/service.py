"""Service commands: ``ldreg serve``, ``ldreg api``, ``ldreg worker``.

Nothing here imports torch: ``api`` and ``worker`` must start without it (the worker's
parent forks a child per job, and CUDA cannot survive a fork).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import typer

from cli.common import fail
from cli.processes import ServiceProcess, free_port, wait_http_ok

log = logging.getLogger("ldreg.cli")

DEMO_TEAM = "demo"
# Small enough to finish in a minute or two on a laptop CPU, big enough to show every
# metric move: LDReg switches on after one warm-up epoch.
DEMO_SPEC = {
    "method": "simclr",
    "backbone": "resnet18",
    "width": 16,
    "dataset": {"name": "digits", "image_size": 16},
    "epochs": 5,
    "batch_size": 128,
    "optimizer": {"name": "lars", "lr": 0.3, "weight_decay": 1e-6},
    "ldreg": {"alpha": 0.01, "k": 32, "estimator": "mom", "target": "features", "warmup_epochs": 1},
    "eval": {"lid_k": [32, 512]},
    "seed": 0,
}


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    # Alembic announces every plugin and migration step at INFO on each start.
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _schema_at_head(url: str) -> bool:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from service.db import alembic_config, engine_for

    heads = set(ScriptDirectory.from_config(alembic_config(url)).get_heads())
    with engine_for(url).connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return current == heads


def _ensure_schema(url: str, *, timeout: float) -> None:
    """SQLite (one machine): migrate. PostgreSQL: wait for the migration job (compose's
    ``migrate`` service, or ``ldreg admin migrate``) instead of racing it."""
    from service.db import migrate

    if url.startswith("sqlite"):
        migrate(url)
        return
    deadline = time.monotonic() + timeout
    while not _schema_at_head(url):
        if time.monotonic() > deadline:
            typer.echo(
                "the database schema is not at the latest migration; run `ldreg admin migrate`",
                err=True,
            )
            raise typer.Exit(code=2)
        time.sleep(1.0)


def _release_database_connections(url: str) -> None:
    """Close pooled connections before forking, so no child shares a socket."""
    from service.db import engine_for, session_factory

    engine_for(url).dispose()
    engine_for.cache_clear()
    session_factory.cache_clear()


def api(
    host: str = typer.Option("127.0.0.1", "--host", help="interface to listen on"),
    port: int = typer.Option(8000, "--port", help="TCP port"),
    workers: int = typer.Option(1, "--workers", help="uvicorn worker processes"),
    access_log: bool = typer.Option(
        True,
        "--access-log/--no-access-log",
        help="one JSON log line per request (about 8 % of a job poll's CPU)",
    ),
) -> None:
    """Run the HTTP API alone (applies database migrations first)."""
    import uvicorn

    from service.db import migrate, wait_for_database
    from service.settings import get_settings

    _setup_logging()
    settings = get_settings()
    wait_for_database(settings.database_url, timeout=60)
    migrate(settings.database_url)
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        proxy_headers=True,
        log_level="info",
        access_log=access_log,
        # Open log streams (GET /v1/jobs/{id}/logs?follow=true) last until their job
        # ends; a stop waits this long for them, then closes them.
        timeout_graceful_shutdown=5,
    )


def worker(
    queues: str = typer.Option("cpu", "--queues", "-Q", help="comma-separated: cpu, gpu"),
    concurrency: int | None = typer.Option(
        None, "--concurrency", "-c", min=1, help="job slots (default: one per device)"
    ),
    devices: int | None = typer.Option(
        None,
        "--devices",
        min=1,
        envvar="LDREG_WORKER_DEVICES",
        help="GPUs this worker holds (default: the GPUs it sees, or 1 on the cpu queue)",
    ),
    memory_gb: float | None = typer.Option(
        None, "--memory-gb", min=0.1, help="host memory for jobs (scheduler), if limited"
    ),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
    sweeper: bool = typer.Option(
        True, "--sweeper/--no-sweeper", help="also run the stale-job sweeper"
    ),
    hostname: str | None = typer.Option(
        None, "--hostname", "-n", help="Celery node name (default: ldreg-QUEUES-PID@%h)"
    ),
) -> None:
    """Run one Celery worker (prefork, one fresh child per job) and its sweeper."""
    from service.db import wait_for_database
    from service.queue import QUEUES
    from service.settings import get_settings

    _setup_logging(loglevel)
    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(names) - set(QUEUES))
    if not names or unknown:
        raise typer.BadParameter(f"queues must be among {', '.join(QUEUES)}", param_hint="--queues")
    if names == ["gpu"] and not _sees_a_gpu():
        logging.getLogger("ldreg.worker").warning(
            "this worker takes only the gpu queue but sees no GPU (no /dev/nvidia*, or"
            " CUDA_VISIBLE_DEVICES is empty): its jobs will train on the CPU"
        )
    settings = get_settings()
    wait_for_database(settings.database_url, timeout=60)
    _ensure_schema(settings.database_url, timeout=120)

    from celery.utils.nodenames import host_format

    from worker import sweeper as sweeper_mod

    nodename = hostname or f"ldreg-{'-'.join(names)}-{os.getpid()}@%h"
    gpus = devices or ((_visible_gpus() if "gpu" in names else 0) or 1)
    # Registered before the first message is taken (service/claiming.py); then kept
    # (heartbeat, deletion at a clean stop) by the sweeper's process, which never
    # forks; with --no-sweeper that process only keeps the registration.
    registration = sweeper_mod.Registration(
        worker_id=host_format(nodename), queues=tuple(names), gpus=gpus, memory_gb=memory_gb
    )
    sweeper_mod.register(settings, registration)
    _release_database_connections(settings.database_url)
    if "torch" in sys.modules:  # pragma: no cover - a programming error, not a runtime one
        raise RuntimeError("the worker's parent process must not import torch")

    from worker.celery_app import app

    sweeper_proc = sweeper_mod.start_process(registration=registration, sweeping=sweeper)
    argv = [
        "worker",
        f"--queues={','.join(names)}",
        f"--concurrency={concurrency or gpus}",
        "--pool=prefork",
        f"--loglevel={loglevel.upper()}",
        f"--hostname={nodename}",
        # Worker-to-worker chatter we do not use; mingle also delays startup.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    try:
        app.worker_main(argv)
    finally:
        if sweeper_proc is not None:
            sweeper_proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                sweeper_proc.wait(10)


def _visible_gpus() -> int:
    """How many NVIDIA devices this process sees (CUDA_VISIBLE_DEVICES, else
    /dev/nvidiaN), without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return 0 if visible in ("", "-1") else len([v for v in visible.split(",") if v.strip()])
    return len(list(Path("/dev").glob("nvidia[0-9]*")))


def _sees_a_gpu() -> bool:
    """An NVIDIA device is visible to this process, judged without importing torch (the
    worker's parent must not: CUDA cannot survive a fork)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def _spawn(args: list[str]) -> ServiceProcess:
    # Own session: the terminal's Ctrl-C reaches only `serve`, which then stops each
    # child in order (the worker hands its running job back first).
    return ServiceProcess([sys.executable, "-m", "cli.main", *args]).start()


def _stop(procs: list[ServiceProcess], timeout: float = 30.0) -> None:
    """SIGTERM to each child itself (``ServiceProcess.terminate``), all within
    ``timeout``; whatever a child leaves in its group afterwards is killed."""
    for p in procs:
        p.terminate(group=False)
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(deadline - time.monotonic())
        p.finish()


DEMO_JOB_NAME = "demo: SimCLR + LDReg on digits"
DEFAULT_PORT = 8000


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _choose_port(host: str, port: int | None) -> int:
    """The port asked for, refused at once when taken; without one, 8000, or a free
    port when 8000 is taken (said on the console)."""
    if port is not None:
        if not _port_free(host, port):
            fail(
                f"port {port} on {host} is already in use by another process; pick another"
                " with --port N (make demo PORT=N)",
                2,
            )
        return port
    if _port_free(host, DEFAULT_PORT):
        return DEFAULT_PORT
    chosen = free_port()
    typer.echo(f"port {DEFAULT_PORT} is in use by another process; serving on {chosen}")
    return chosen


def _demo_key(url: str, kept: Path) -> str:
    """The demo team's key, kept in ``kept`` (readable by this user only) and reused
    while it is valid; a new one (and the team, the first time) otherwise. Only hashes
    are in the database, so the file is the one place the key can be read again."""
    from sqlalchemy import select

    from service.auth import create_key, create_team, find_team, hash_key
    from service.db import session_scope
    from service.models import ApiKey

    with session_scope(url) as s:
        if kept.is_file():
            key = kept.read_text().strip()
            live = s.scalars(
                select(ApiKey.id).where(
                    ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)
                )
            ).first()
            if live is not None:
                return key
        team = find_team(session=s, name_or_id=DEMO_TEAM)
        if team is not None:
            key = create_key(session=s, team=team)
        else:
            key = create_team(session=s, name=DEMO_TEAM)[1]
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.touch(mode=0o600)
    kept.write_text(key + "\n")
    return key


def _demo_job(base: str, key: str) -> tuple[str, bool]:
    """The demo job: the team's earlier one unless it failed or was cancelled, else a
    new one. Returns its id and whether it was submitted now."""
    import httpx

    auth = {"Authorization": f"Bearer {key}"}
    listed = httpx.get(f"{base}/v1/jobs", headers=auth, params={"kind": "pretrain"}, timeout=30)
    listed.raise_for_status()
    for job in listed.json()["jobs"]:
        if job["name"] == DEMO_JOB_NAME and job["state"] not in ("failed", "cancelled"):
            return job["id"], False
    r = httpx.post(
        f"{base}/v1/jobs",
        headers=auth,
        json={"kind": "pretrain", "name": DEMO_JOB_NAME, "spec": DEMO_SPEC},
        timeout=30,
    )
    r.raise_for_status()
    return r.json()["id"], True


def _command_path() -> str:
    """How to call ``ldreg`` from here: the venv's script, relative when it is below."""
    script = Path(sys.executable).with_name("ldreg")
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="interface for the API"),
    port: int | None = typer.Option(
        None, "--port", help="TCP port for the API [default: 8000, or a free one if taken]"
    ),
    demo: bool = typer.Option(
        False, "--demo", help="seed a demo team, print its key and submit a small LDReg job"
    ),
) -> None:
    """Run the API and one worker together (the embedded default unless LDREG_* say
    otherwise) until Ctrl-C."""
    from service.db import migrate, wait_for_database
    from service.settings import get_settings

    _setup_logging()
    port = _choose_port(host, port)
    settings = get_settings()
    wait_for_database(settings.database_url, timeout=60)
    migrate(settings.database_url)
    _release_database_connections(settings.database_url)

    procs: list[ServiceProcess] = []
    stopping = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        api_args = ["api", "--host", host, "--port", str(port)]
        if demo:
            api_args.append("--no-access-log")  # a readable console: the key and next steps
        procs.append(_spawn(api_args))
        # One worker for both queues: on this machine it runs whatever is submitted.
        procs.append(_spawn(["worker", "--queues", "cpu,gpu"]))
        wait_http_ok(f"{base}/healthz", proc=procs[0])
        typer.echo(f"\nLDReg service: API on {base} (docs: {base}/docs)")
        typer.echo(f"database: {settings.database_url}\nbroker:   {settings.broker_url}")
        if demo:
            kept = settings.home.resolve() / "demo-api-key"
            key = _demo_key(settings.database_url, kept)
            job_id, submitted = _demo_job(base, key)
            intro = (
                "submitted a small SimCLR + LDReg pretraining job on digits"
                if submitted
                else "the demo job (submitted by an earlier run)"
            )
            typer.echo(
                f"\ndemo team '{DEMO_TEAM}' API key (kept in {kept}):\n  {key}\n"
                f"\n{intro}:\n  {base}/v1/jobs/{job_id}\n"
                f"\nnext:\n"
                f"  export LDREG_URL={base} LDREG_API_KEY={key}\n"
                f"  {_command_path()} watch {job_id}\n"
                f"  or open {base}/ and paste the key\n"
            )
        typer.echo("serving; press Ctrl-C to stop")
        while not stopping:
            for p in procs:
                if not p.alive():
                    typer.echo(
                        f"a service process exited (code {p.returncode}); stopping", err=True
                    )
                    stopping = True
            time.sleep(0.5)
    finally:
        typer.echo("stopping (a running job is handed back to the queue)...")
        _stop(procs)
