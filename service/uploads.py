"""Uploaded embeddings for diagnose jobs: validated, then recorded.

``api/multipart.py`` streams the request's ``file`` part into a temporary file (an
upload is never held in memory); here it is validated and, only when complete and
valid, renamed into place and recorded.

Validation never unpickles: ``.npy`` headers are read with ``allow_pickle=False`` and
memory-mapped, ``.npz`` members are loaded with ``allow_pickle=False``, so an object
array (which would need pickle) is refused instead of executed.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from service.errors import InvalidInput, PayloadTooLarge
from service.models import Team, Upload, new_id
from service.settings import Settings

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


@dataclass
class EmbeddingsInfo:
    format: str  # "npy" | "npz"
    num_points: int
    dim: int
    dtype: str
    has_labels: bool


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
