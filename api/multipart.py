"""Receiving an upload: the multipart body parsed as it arrives, straight to disk.

python-multipart's push parser feeds the ``file`` part into a temporary file next to
its final place, so an upload is never held in memory and never spooled anywhere
unbounded: the byte count is checked on every chunk and the upload stops with 413 the
moment it passes the limit, leaving nothing behind. ``service.uploads`` then
validates the file and records it (:func:`save_upload`).
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session

from service.errors import InvalidInput
from service.models import Team, Upload
from service.settings import Settings
from service.uploads import (
    ReceivedFile,
    create_upload,
    inspect_embeddings,
    too_large,
)

# Room for the multipart framing (boundaries, part headers) around the file itself.
MULTIPART_OVERHEAD = 64 * 1024
# Buffer this much before handing a write to a thread, so a big upload costs a few
# thousand thread hops instead of one per network chunk.
WRITE_BATCH = 1024 * 1024


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


def _display_name(filename: str) -> str:
    name = Path(filename.replace("\\", "/")).name
    return "".join(c for c in name if c.isprintable())[:300] or "upload"


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
