"""Service processes started by another process: ``ldreg serve``, the service tests and
the benchmarks share this one harness (a free port, a child in its own process
group, a wait for its health endpoint, a stop that leaves nothing behind)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """A child in its own session (process group), so a signal from outside can reach
    all it started (a Celery worker's pool, its sweeper); its output goes to
    ``log_path``, or to this process's terminal when there is none.

    Usage::

        api = ServiceProcess(["ldreg", "api", "--port", str(port)], env, log).start()
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc=api)
        api.stop()
    """

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self._log: IO[bytes] | None = None
        self.popen: subprocess.Popen[bytes]

    def start(self) -> ServiceProcess:
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.args,
            env=self.env,
            cwd=self.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log is not None else None,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group."""
        if self.alive() or sig == signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def terminate(self, *, group: bool = True) -> None:
        """SIGTERM to the group, or with ``group=False`` to the child alone, as ``docker
        stop`` does (a Celery worker then stops its own pool; SIGTERM to its whole group
        also hits an idle pool child mid-wait, and the pool can hang at exit)."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.popen.pid, signal.SIGTERM)
            else:
                os.kill(self.popen.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(max(timeout, 0.1))

    def stop(self, timeout: float = 20.0, *, group: bool = True) -> None:
        """SIGTERM (see :meth:`terminate`), up to ``timeout`` seconds to exit, then
        SIGKILL to whatever is left in the group."""
        self.terminate(group=group)
        self.wait(timeout)
        self.finish()

    def finish(self) -> None:
        """SIGKILL what is left in the group (children a stopped parent left behind),
        reap the child, close the log."""
        self.kill(signal.SIGKILL)
        self.wait(10)
        if self._log is not None and not self._log.closed:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


def wait_http_ok(url: str, timeout: float = 60.0, proc: ServiceProcess | None = None) -> None:
    """Until ``url`` answers 200; fails early, with the end of its log, if ``proc``
    exits first."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"process exited during startup\n{proc.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        time.sleep(0.1)
    tail = f"\n{proc.log()[-4000:]}" if proc is not None else ""
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s{tail}")
