"""An attempt's log file (worker.joblog, worker.runner._job_log) and reading it back
(service.logs), in-process: no database, no worker."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldreg.errors import DatasetError
from service.logs import attempt_log_name, read_chunk, tail_offset
from worker.joblog import attempt_log
from worker.runner import _job_log

log = logging.getLogger("tests.joblog")


def wait_for_text(path: Path, text: str, timeout: float = 2.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content or time.monotonic() > deadline:
            return content
        time.sleep(0.02)


def test_records_and_output_reach_the_file_line_by_line_and_the_console_too(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # A console handler on the real stderr, as service.logging's JSON lines are.
    console = logging.StreamHandler(sys.__stderr__)
    console.setFormatter(logging.Formatter("CONSOLE %(message)s"))
    log.addHandler(console)
    log.setLevel(logging.INFO)
    try:
        with attempt_log(tmp_path, 3) as job_log:
            path = tmp_path / attempt_log_name(3)
            assert job_log.path == path
            log.info("a record")
            # Each line is there while the attempt still runs.
            assert "INFO tests.joblog: a record" in wait_for_text(path, "a record")
            # Python's own stdout (pytest swaps sys.stdout for its capture; a Celery
            # child's is a proxy that logs, so its prints are records there).
            print("printed", file=sys.__stdout__, flush=True)
            os.write(2, b"raw stderr\n")
            subprocess.run(["sh", "-c", "echo from a child process"], check=True)
            assert "from a child process" in wait_for_text(path, "from a child process")
            os.write(1, b"no newline yet")
            # A partial line is written once it has waited a second.
            assert "no newline yet\n" in wait_for_text(path, "no newline yet", timeout=3)
    finally:
        log.removeHandler(console)
    text = (tmp_path / "logs" / "attempt-3.log").read_text()
    for line in ("printed", "raw stderr", "from a child process"):
        assert f"{line}\n" in text
    # The console handler kept writing to the real stderr, not into the file.
    assert "CONSOLE" not in text
    out, err = capfd.readouterr()
    assert "printed" in out and "from a child process" in out and "no newline yet" in out
    assert "raw stderr" in err and "CONSOLE a record" in err
    # Outside the block nothing is captured any more.
    print("after", file=sys.__stdout__, flush=True)
    assert "after" not in (tmp_path / "logs" / "attempt-3.log").read_text()


def test_each_attempt_has_its_own_file_ending_with_how_it_ended(tmp_path: Path) -> None:
    with pytest.raises(DatasetError), _job_log(tmp_path, 1):
        log.warning("first try")
        raise DatasetError("no such folder 'cifar'")
    with _job_log(tmp_path, 2):
        log.warning("second try")
    first = (tmp_path / "logs" / "attempt-1.log").read_text()
    second = (tmp_path / "logs" / "attempt-2.log").read_text()
    assert "first try" in first and "second try" not in first
    assert first.rstrip().endswith("failed: dataset_error: no such folder 'cifar'")
    assert "second try" in second and "first try" not in second
    assert second.rstrip().endswith("attempt 2 done; recording the result")

    with pytest.raises(ZeroDivisionError), _job_log(tmp_path, 3):
        _ = 1 / 0
    third = (tmp_path / "logs" / "attempt-3.log").read_text()
    assert "attempt 3 ended by an error" in third and "ZeroDivisionError" in third


def test_reads_return_whole_lines_from_an_offset(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    assert read_chunk(path, 0, complete=False).data == b""  # not created yet
    path.write_bytes(b"one\ntwo\nthr")
    chunk = read_chunk(path, 0, complete=False)
    assert (chunk.data, chunk.offset, chunk.size) == (b"one\ntwo\n", 8, 11)
    assert read_chunk(path, chunk.offset, complete=False).data == b""
    # Once the attempt is over, the last line comes without its newline.
    assert read_chunk(path, chunk.offset, complete=True).data == b"thr"
    # At most `limit` bytes, still cut at a line's end.
    assert read_chunk(path, 0, complete=True, limit=6).data == b"one\n"
    # A line longer than a chunk comes in pieces.
    path.write_bytes(b"x" * 100)
    assert read_chunk(path, 0, complete=False, limit=10).data == b"x" * 10


def test_tail_offset_finds_the_last_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_bytes(b"a\nb\nc\nd\n")
    assert path.read_bytes()[tail_offset(path, 2) :] == b"c\nd\n"
    assert tail_offset(path, 10) == 0
    assert path.read_bytes()[tail_offset(path, 1, since=0) :] == b"d\n"
    path.write_bytes(b"a\nb\nc")
    assert path.read_bytes()[tail_offset(path, 2) :] == b"b\nc"
    assert tail_offset(tmp_path / "missing.log", 5) == 0
    # While the attempt runs, a last line without its newline is not one of them.
    assert tail_offset(path, 1, complete=False) == 2  # "b\n"; "c" is not whole yet
    assert tail_offset(path, 5, complete=False) == 0
    path.write_bytes(b"no newline yet")
    assert tail_offset(path, 1, complete=False) == 0
    assert tail_offset(path, 0) == len(b"no newline yet")
