"""Local commands: train or measure on this machine, no service involved.

torch and the science library are imported inside the commands: ``cli.main`` is also
the entry point of ``ldreg api``, which must start without loading torch.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cli.common import fail, read_mapping

if TYPE_CHECKING:
    from torch import Tensor

console = Console()

# Columns of the per-epoch table, in order; others are kept in the run's checkpoints.
EPOCH_COLUMNS = (
    "loss",
    "ssl_loss",
    "ldreg_loss",
    "knn_acc",
    "online_probe_acc",
    "linear_probe_acc",
    "lid_gmean_k32",
    "lid_gmean_k512",
    "ldreg_lid_gmean",
    "effective_rank",
    "epoch_seconds",
)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def load_spec_file(path: Path):
    """Parse a YAML/JSON pretrain spec; pydantic errors become ``field: reason`` lines."""
    from pydantic import ValidationError

    from ldreg.spec import PretrainSpec, field_errors

    raw = read_mapping(path)
    try:
        return PretrainSpec.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {field}: {reason}" for field, reason in field_errors(e)]
        # Several lines: one per field (``fail`` would join them into one).
        print(f"ldreg: error: invalid spec {path}:\n" + "\n".join(lines), file=sys.stderr)
        raise typer.Exit(2) from None


class ConsoleSink:
    """Draws a progress bar over all steps and prints one line per finished epoch.

    The first Ctrl-C asks training to stop at its next poll (the last checkpoint is
    kept, so the same command with ``--run-dir`` resumes); a second one aborts.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task: TaskID | None = None
        self.epochs = 0
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.stop_requested = False

    def on_train_start(self, *, start_epoch: int, epochs: int, steps_per_epoch: int) -> None:
        self.epochs = epochs
        done = (start_epoch - 1) * steps_per_epoch
        if start_epoch > 1:
            self.console.print(f"resuming at epoch {start_epoch} of {epochs}")
        self.progress.start()
        self.task = self.progress.add_task(
            "train",
            total=epochs * steps_per_epoch,
            completed=done,
            epoch=min(start_epoch, epochs),
            epochs=epochs,
            loss="-",
        )

    def on_step(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
        if self.task is not None:
            self.progress.update(
                self.task, completed=step, epoch=epoch, loss=_fmt(metrics.get("loss"))
            )

    def on_epoch_end(self, *, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.rows.append((epoch, dict(metrics)))
        cells = "  ".join(
            f"{name} {_fmt(metrics[name])}" for name in EPOCH_COLUMNS if name in metrics
        )
        self.progress.console.print(f"epoch {epoch}/{self.epochs}  {cells}", highlight=False)

    def on_checkpoint(self, *, epoch: int, path: Path) -> None:
        pass

    def should_stop(self) -> bool:
        return self.stop_requested

    def close(self) -> None:
        self.progress.stop()

    def table(self) -> Table:
        table = Table(title="per-epoch metrics")
        table.add_column("epoch", justify="right")
        shown = [c for c in EPOCH_COLUMNS if any(c in m for _, m in self.rows)]
        for name in shown:
            table.add_column(name, justify="right")
        for epoch, m in self.rows:
            table.add_row(str(epoch), *(_fmt(m.get(name)) for name in shown))
        return table


def pretrain(
    spec_file: Annotated[Path, typer.Argument(help="pretrain spec (YAML or JSON)")],
    devices: Annotated[
        int | None, typer.Option("--devices", min=1, help="processes (GPUs) to train on")
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(help="checkpoints and backbone.pt go here; an existing run resumes"),
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(help="dataset paths resolve under it (default: $LDREG_DATA_ROOT or .)"),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if any)")] = None,
) -> None:
    """Train locally with a progress bar and print per-epoch metrics."""
    spec = load_spec_file(spec_file)
    if devices is not None:
        from pydantic import ValidationError

        from ldreg.spec import field_errors

        try:
            dump = spec.model_dump()
            # devices and resources.gpus are one number: override both.
            resources = {**dump["resources"], "gpus": devices}
            spec = type(spec).model_validate({**dump, "devices": devices, "resources": resources})
        except ValidationError as e:
            fail("; ".join(reason for _, reason in field_errors(e)), 2)
    if device is not None and device not in ("cpu", "cuda"):
        fail(f"--device must be 'cpu' or 'cuda', found '{device}'", 2)
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{spec_file.stem}-{stamp}"
    if data_root is None:
        data_root = Path(os.environ.get("LDREG_DATA_ROOT", "."))

    from ldreg.errors import LDRegError, TrainingCancelled, UserError
    from ldreg.train import pretrain as run_pretrain

    sink = ConsoleSink(console)

    def request_stop(signum: int, frame: Any) -> None:
        if sink.stop_requested:
            raise KeyboardInterrupt
        sink.stop_requested = True
        console.print("stopping at the next step (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, request_stop)
    console.print(f"run directory: {run_dir}")
    started = time.perf_counter()
    try:
        summary = run_pretrain(spec, run_dir=run_dir, data_root=data_root, sink=sink, device=device)
    except TrainingCancelled as e:
        sink.close()
        fail(f"{e.message}; resume with --run-dir {run_dir}", code=130)
    except UserError as e:
        sink.close()
        fail(f"{e.message} [{e.code}]", 2)
    except LDRegError as e:
        sink.close()
        fail(f"{e.message} [{e.code}]", code=1)
    finally:
        signal.signal(signal.SIGINT, previous)
    sink.close()
    if sink.rows:
        console.print(sink.table())
    console.print(f"done in {time.perf_counter() - started:.1f}s; backbone: {run_dir}/backbone.pt")
    console.print("summary: " + json.dumps({k: round(v, 6) for k, v in summary.items()}))


def lid(
    embeddings: Annotated[Path, typer.Argument(help=".npy file of shape (N, D)")],
    k: Annotated[
        list[int] | None, typer.Option("--k", help="neighbourhood size; repeatable")
    ] = None,
    estimator: Annotated[
        list[str] | None, typer.Option("--estimator", help="mle, mom or tle; repeatable")
    ] = None,
) -> None:
    """Report LID (geometric mean per estimator and k) and effective rank of embeddings."""
    import numpy as np

    try:
        with open(embeddings, "rb") as f:
            magic = f.read(6)
    except FileNotFoundError:
        fail(f"file not found: {embeddings}", 2)
    except OSError as e:
        fail(f"cannot read {embeddings}: {e}", 2)
    if magic != b"\x93NUMPY" and magic[:4] != b"PK\x03\x04":
        fail(
            f"{embeddings} is not a .npy or .npz file; write the (N, D) array with"
            " numpy.save (a CSV: numpy.save(path, numpy.loadtxt(csv, delimiter=','))",
            2,
        )
    try:
        loaded = np.load(embeddings, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            names = [n for n in loaded.files if n != "labels"]
            if "embeddings" not in loaded.files and len(names) != 1:
                fail(f"{embeddings} must hold an array named 'embeddings'; found {names}", 2)
            loaded = loaded["embeddings" if "embeddings" in loaded.files else names[0]]
        array = loaded
    except (OSError, ValueError) as e:
        fail(f"{embeddings} is not a readable array (object arrays are refused): {e}", 2)
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        shape = getattr(array, "shape", None)
        fail(f"embeddings must be a 2-D array (N, D), found shape {shape}", 2)
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        fail(f"embeddings must be real numbers, found dtype {array.dtype}", 2)
    n = array.shape[0]
    if n < 3:
        fail(f"need at least 3 points, found {n}", 2)
    if not np.isfinite(array).all():
        fail(f"embeddings contain {int((~np.isfinite(array)).sum())} NaN/inf values", 2)
    estimators = estimator or ["mle", "mom"]
    for name in estimators:
        if name not in ("mle", "mom", "tle"):
            fail(f"--estimator must be mle, mom or tle, found '{name}'", 2)
    if k:
        for value in k:
            if not 2 <= value < n:
                fail(f"--k {value} must be between 2 and {n - 1} (N - 1 for N={n} points)", 2)
        ks = list(dict.fromkeys(k))
    else:
        ks = sorted({min(v, n - 1) for v in (32, 64, 512)})

    import torch

    from ldreg.lid import geometric_mean, lid_mle, lid_mom, lid_tle
    from ldreg.rank import effective_rank

    functions: dict[str, Callable[..., Tensor]] = {"mle": lid_mle, "mom": lid_mom, "tle": lid_tle}
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    table = Table(title=f"LID of {embeddings.name}: {n} points, {array.shape[1]} dims")
    table.add_column("estimator")
    for value in ks:
        table.add_column(f"k={value}", justify="right")
    for name in estimators:
        cells = [f"{geometric_mean(functions[name](x, k=value)):.4f}" for value in ks]
        table.add_row(name, *cells)
    console.print(table)
    console.print("values: geometric mean of the per-point LIDs")
    console.print(f"effective rank: {float(effective_rank(x)):.4f}")
