"""Uploaded embeddings for diagnose jobs: streamed to disk, size-limited, validated.

The request body is parsed as it arrives (python-multipart's push parser) and the
``file`` part goes straight into a temporary file next to its final place, so an
upload is never held in memory and never spooled anywhere unbounded: the byte count
is checked on every chunk and the upload stops with 413 the moment it passes the
limit, leaving nothing behind. Only a complete, valid file is renamed into place.

Validation never unpickles: ``.npy`` headers are read with ``allow_pickle=False`` and
memory-mapped, ``.npz`` members are loaded with ``allow_pickle=False``, so an object
array (which would need pickle) is refused instead of executed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session

from service.errors import InvalidInput, PayloadTooLarge
from service.models import Team, Upload, new_id
from service.settings import Settings

# Room for the multipart framing (boundaries, part headers) around the file itself.
MULTIPART_OVERHEAD = 64 * 1024
# Buffer this much before handing a write to a thread, so a big upload costs a few
# thousand thread hops instead of one per network chunk.
WRITE_BATCH = 1024 * 1024
FLOAT_DTYPES = ("float16", "float32", "float64")
# LID needs neighbours besides the point itself; a diagnose job later needs N > max(k).
MIN_POINTS = 3
# Finite-value check works through the matrix this many bytes at a time.
CHECK_CHUNK_BYTES = 16 * 1024 * 1024


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"upload is over this server's limit of {_human(max_bytes)}", field="file"
    )


@dataclass
class ReceivedFile:
    path: Path
    filename: str
    size: int
    sha256: str


class _FilePartReceiver:
    """Callbacks for python-multipart: the ``field`` part's bytes go to ``dest``."""

    def __init__(self, *, field: str, dest: Path, max_bytes: int) -> None:
        self.field = field
        self.dest = dest
        self.max_bytes = max_bytes
        self.size = 0
        self.filename: str | None = None
        self.finished = False
        self.ended = False
        self.pending = bytearray()
        self.file: IO[bytes] | None = None
        self.hasher = hashlib.sha256()
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._in_file_part = False

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._in_file_part = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if options.get(b"name", b"").decode("utf-8", "replace") != self.field:
            return  # other form fields are ignored (their bytes are dropped, not kept)
        if self.filename is not None:
            raise InvalidInput(f"send exactly one '{self.field}' part", field=self.field)
        self.filename = options.get(b"filename", b"upload").decode("utf-8", "replace")
        self.file = open(self.dest, "xb")  # noqa: SIM115 - closed by receive_multipart_file
        self._in_file_part = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._in_file_part:
            return
        self.size += end - start
        if self.size > self.max_bytes:
            raise too_large(self.max_bytes)
        self.pending += data[start:end]

    def on_part_end(self) -> None:
        if self._in_file_part:
            self.finished = True
            self._in_file_part = False

    def on_end(self) -> None:
        self.ended = True

    def flush(self) -> None:
        """Write and hash what is pending (runs in a worker thread)."""
        if self.file is not None and self.pending:
            chunk = bytes(self.pending)
            self.pending.clear()
            self.file.write(chunk)
            self.hasher.update(chunk)


async def receive_multipart_file(
    *,
    chunks: AsyncIterator[bytes],
    content_type: str,
    dest_dir: Path,
    max_bytes: int,
    field: str = "file",
) -> ReceivedFile:
    """Stream the ``field`` part of a multipart body into a temporary file in
    ``dest_dir``; raises 413/422-class errors and then leaves no file behind."""
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/form-data" or b"boundary" not in params:
        raise InvalidInput(
            f"send the embeddings as multipart/form-data with a '{field}' part", field=field
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f".incoming-{uuid.uuid4().hex}.part"
    receiver = _FilePartReceiver(field=field, dest=dest, max_bytes=max_bytes)
    callbacks = {
        name: getattr(receiver, name)
        for name in (
            "on_part_begin",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_part_data",
            "on_part_end",
            "on_end",
        )
    }
    parser = MultipartParser(params[b"boundary"], callbacks)  # type: ignore[arg-type]
    body_size = 0
    try:
        try:
            async for chunk in chunks:
                body_size += len(chunk)
                # Bounds the whole body too: ignored fields must not be unlimited either.
                if body_size > max_bytes + MULTIPART_OVERHEAD:
                    raise too_large(max_bytes)
                try:
                    parser.write(chunk)
                except FormParserError as exc:
                    raise InvalidInput(f"malformed multipart body: {exc}", field=field) from None
                if len(receiver.pending) >= WRITE_BATCH:
                    await anyio.to_thread.run_sync(receiver.flush)
            parser.finalize()
            await anyio.to_thread.run_sync(receiver.flush)
        finally:
            if receiver.file is not None:
                receiver.file.close()
        if receiver.filename is None:
            raise InvalidInput(f"the form has no '{field}' part", field=field)
        if not (receiver.finished and receiver.ended):
            raise InvalidInput("the upload ended before the whole file arrived", field=field)
    except BaseException:
        # Includes the client disconnecting mid-upload: never leave a partial file.
        dest.unlink(missing_ok=True)
        raise
    return ReceivedFile(
        path=dest,
        # Display only: path parts and control characters (NUL, which PostgreSQL cannot
        # store, among them) are dropped.
        filename=_display_name(receiver.filename),
        size=receiver.size,
        sha256=receiver.hasher.hexdigest(),
    )


@dataclass
class EmbeddingsInfo:
    format: str  # "npy" | "npz"
    num_points: int
    dim: int
    dtype: str
    has_labels: bool


def _display_name(filename: str) -> str:
    name = Path(filename.replace("\\", "/")).name
    return "".join(c for c in name if c.isprintable())[:300] or "upload"


def _bad(message: str) -> InvalidInput:
    return InvalidInput(message, field="file", code="invalid_embeddings")


def _check_embeddings(x, *, what: str) -> tuple[int, int, str]:
    import numpy as np

    if x.ndim != 2:
        raise _bad(f"{what} must be a 2-D array (N points × D dimensions), got shape {x.shape}")
    if x.dtype.name not in FLOAT_DTYPES:
        raise _bad(f"{what} must be float16, float32 or float64, got {x.dtype.name}")
    n, d = x.shape
    if n < MIN_POINTS or d < 1:
        raise _bad(
            f"{what} needs at least {MIN_POINTS} points of at least 1 dimension, got {n}×{d}"
        )
    rows = max(1, CHECK_CHUNK_BYTES // max(1, d * x.dtype.itemsize))
    for start in range(0, n, rows):
        block = np.asarray(x[start : start + rows])
        if not np.isfinite(block).all():
            bad_row = start + int(np.argwhere(~np.isfinite(block))[0][0])
            raise _bad(f"{what} contain NaN or infinite values (first at row {bad_row})")
    return n, d, x.dtype.name


def inspect_embeddings(path: Path, *, max_unpacked_bytes: int) -> EmbeddingsInfo:
    """Check an uploaded ``.npy`` / ``.npz`` without ever unpickling it.

    ``.npy``: an (N, D) float array. ``.npz``: the array ``embeddings`` (or its only
    array), and optionally ``labels``, 1-D integers of length N.
    """
    import numpy as np

    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        try:
            x = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            if "object" in str(exc).lower() or "pickle" in str(exc).lower():
                raise _bad("object arrays (pickled data) are not accepted") from None
            raise _bad(f"not a readable .npy file: {exc}") from None
        except Exception as exc:
            # numpy parses the header of an untrusted file: a malformed one raises
            # whatever its parser meets (TokenError, SyntaxError, OverflowError for a
            # shape the data cannot back, ...). Each means the same to the user.
            raise _bad(f"not a readable .npy file: {type(exc).__name__}: {exc}") from None
        try:
            n, d, dtype = _check_embeddings(x, what="embeddings")
        finally:
            del x
        return EmbeddingsInfo("npy", n, d, dtype, has_labels=False)

    if magic[:4] != b"PK\x03\x04":
        raise _bad("not a .npy or .npz file (write it with numpy.save or numpy.savez)")
    try:
        with zipfile.ZipFile(path) as zf:
            # A compressed npz could inflate far beyond the upload limit.
            unpacked = sum(info.file_size for info in zf.infolist())
    except zipfile.BadZipFile:
        raise _bad("not a readable .npz file") from None
    if unpacked > max_unpacked_bytes:
        raise _bad(f"the .npz unpacks to {_human(unpacked)}, over {_human(max_unpacked_bytes)}")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [name for name in z.files if name != "labels"]
            if "embeddings" in z.files:
                key = "embeddings"
            elif len(names) == 1:
                key = names[0]
            else:
                raise _bad(
                    "the .npz must hold an array named 'embeddings' (and optionally 'labels');"
                    f" found {sorted(z.files)}"
                )
            x = z[key]
            n, d, dtype = _check_embeddings(x, what=f"embeddings ('{key}')")
            has_labels = "labels" in z.files
            if has_labels:
                labels = z["labels"]
                if labels.ndim != 1 or labels.shape[0] != n:
                    raise _bad(
                        f"labels must be a 1-D array of length {n}, got shape {labels.shape}"
                    )
                if not np.issubdtype(labels.dtype, np.integer):
                    raise _bad(f"labels must be integers, got {labels.dtype.name}")
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise _bad("object arrays (pickled data) are not accepted") from None
        raise _bad(f"not a readable .npz file: {exc}") from None
    except InvalidInput:
        raise
    except Exception as exc:  # as for .npy: any failure to parse means unreadable
        raise _bad(f"not a readable .npz file: {type(exc).__name__}: {exc}") from None
    return EmbeddingsInfo("npz", n, d, dtype, has_labels=has_labels)


def create_upload(
    *,
    session: Session,
    settings: Settings,
    team: Team,
    received: ReceivedFile,
    info: EmbeddingsInfo,
) -> Upload:
    """Move a validated file into place and record it for the team."""
    upload_id = new_id()
    final = settings.upload_root / team.id / f"{upload_id}.{info.format}"
    final.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the temporary file, so the rename is atomic.
    os.replace(received.path, final)
    upload = Upload(
        id=upload_id,
        team_id=team.id,
        filename=received.filename,
        path=str(final),
        size=received.size,
        sha256=received.sha256,
        num_points=info.num_points,
        dim=info.dim,
        dtype=info.dtype,
        has_labels=info.has_labels,
    )
    session.add(upload)
    try:
        session.commit()
    except BaseException:
        session.rollback()
        final.unlink(missing_ok=True)
        raise
    return upload


async def save_upload(
    *,
    session: Session,
    settings: Settings,
    team: Team,
    chunks: AsyncIterator[bytes],
    content_type: str,
    content_length: int | None,
) -> Upload:
    """Receive, validate and record one upload; on any failure nothing stays on disk."""
    max_bytes = settings.max_upload_bytes
    # Refuse early when the client announces a body that cannot fit.
    if content_length is not None and content_length > max_bytes + MULTIPART_OVERHEAD:
        raise too_large(max_bytes)
    received = await receive_multipart_file(
        chunks=chunks,
        content_type=content_type,
        dest_dir=settings.upload_root / team.id,
        max_bytes=max_bytes,
    )
    try:
        info = await anyio.to_thread.run_sync(
            lambda: inspect_embeddings(received.path, max_unpacked_bytes=4 * max_bytes)
        )
        return await anyio.to_thread.run_sync(
            lambda: create_upload(
                session=session, settings=settings, team=team, received=received, info=info
            )
        )
    finally:
        with contextlib.suppress(OSError):
            received.path.unlink(missing_ok=True)
