"""Crash-safe checkpoints: atomic writes, a SHA-256 sidecar, fall back to the last good one.

A checkpoint ``epoch_0007.pt`` is written to a temporary file, fsynced and renamed into
place; only then is ``epoch_0007.pt.sha256`` written the same way. A checkpoint without
a matching checksum (a crash between the two renames, a truncated or altered file) is
skipped and the previous one is used. Loading uses ``torch.load(weights_only=True)``, so
a checkpoint holds only tensors and plain containers and loading runs no pickled code.

Usage::

    path = save_checkpoint(state, run_dir / "checkpoints", epoch=3)
    found = load_latest_checkpoint(run_dir / "checkpoints")   # None or (state, path)
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^epoch_(\d{4,})\.pt$")
KEEP_LAST = 2


class CorruptCheckpointError(Exception):
    """The file does not match its checksum or cannot be loaded."""


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch_{epoch:04d}.pt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either its old content or all of ``data``.

    Temporary file in the same directory + fsync + ``os.replace`` (atomic on POSIX),
    then fsync of the directory so the rename itself survives a power loss.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_torch_save(obj: Any, path: Path) -> str:
    """``torch.save`` through :func:`atomic_write_bytes`; returns the SHA-256 hex digest."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(
    state: dict[str, Any], directory: Path, *, epoch: int, keep: int = KEEP_LAST
) -> Path:
    """Write the checkpoint of ``epoch`` and its checksum; keep only the last ``keep``."""
    path = checkpoint_path(directory, epoch)
    digest = atomic_torch_save(state, path)
    atomic_write_bytes(path.with_name(path.name + ".sha256"), f"{digest}\n".encode())
    for old in list_checkpoints(directory)[keep:]:
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory``, newest epoch first."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify ``path`` against its ``.sha256`` sidecar and load it with ``weights_only``."""
    sidecar = path.with_name(path.name + ".sha256")
    try:
        expected = sidecar.read_text().strip()
        data = path.read_bytes()
    except OSError as e:
        raise CorruptCheckpointError(f"{path.name}: {e}") from e
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise CorruptCheckpointError(f"{path.name}: checksum mismatch")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:
        raise CorruptCheckpointError(f"{path.name}: cannot be loaded ({e})") from e


def load_latest_checkpoint(
    directory: Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that verifies and loads, or ``None`` if there is none.

    A corrupt newer checkpoint is logged and skipped in favour of an older valid one.
    """
    for path in list_checkpoints(directory):
        try:
            return load_checkpoint(path, map_location), path
        except CorruptCheckpointError as e:
            log.warning("skipping corrupt checkpoint %s", e)
    return None
