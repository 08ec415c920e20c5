"""A diagnose job in the worker: load the representation, diagnose it, write artifacts.

Two sources (``ldreg.spec.DiagnoseSpec.source``):

* an upload: the team's ``.npy`` (memory-mapped, ``allow_pickle=False``) or ``.npz``
  (``embeddings`` or its only array, optional integer ``labels``), validated at upload
  time by ``service.uploads`` and re-checked here by ``ldreg.diagnose``;
* a finished pretrain job of the same team: its ``backbone.pt`` run over the named
  dataset's held-out split (``extract_features`` in batches, on this worker's device),
  with the pretrain job's seed so a seeded split or a synthetic dataset is the one the
  model was evaluated on during training.

Results: the summary (docs/api.md: ``{"lid_gmean": {"mle": {"32": ...}}, ...}``), and in
the job's folder ``lids.npz`` (per-point LIDs, float32 arrays ``"{estimator}_k{k}"``
in the order of the input points, plus ``labels`` when known) and ``histogram.json``
(log-spaced histograms and full summaries, also per class, for dashboards). Files are
written atomically: the runner lists every finished file of the folder as an artifact.

A diagnosis keeps no checkpoint: an interrupted attempt simply runs again (it is
deterministic for a given spec and input). Cancellation is polled between chunks of
points.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from ldreg.errors import TrainingCancelled, UserError
from ldreg.spec import DiagnoseSpec, JobSource, UploadSource
from service.db import session_scope
from service.models import Artifact, Job, JobState, Upload
from service.settings import Settings

log = logging.getLogger(__name__)

LIDS_ARTIFACT = "lids.npz"
HISTOGRAM_ARTIFACT = "histogram.json"
EXTRACT_BATCH_SIZE = 256
# Share of the progress bar the feature extraction takes for a pretrain-job source;
# the k-NN pass (the expensive part) takes the rest.
EXTRACT_SHARE = 0.3

ArtifactRef = tuple[str, Path, str]


def run_diagnose(
    *,
    spec: DiagnoseSpec,
    job_id: str,
    settings: Settings,
    report_progress: Callable[[float], None],
    should_stop: Callable[[], bool],
    team_id: str | None = None,
    run_dir: Path | None = None,
    device: str | None = None,
) -> tuple[dict[str, Any], list[ArtifactRef]]:
    """Run the diagnosis ``spec`` for job ``job_id``; returns ``(summary, artifacts)``.

    ``report_progress`` gets the fraction done in [0, 1]; ``should_stop`` is polled
    between chunks and makes the job stop with ``TrainingCancelled``. Bad input (an
    unknown or foreign upload or job, a job that has not succeeded, a missing dataset)
    raises ``UserError`` with a message saying what to change.
    """
    import torch  # in the job's own process, never the worker's forking parent

    from ldreg.diagnose import diagnose_embeddings
    from ldreg.train import resolve_device

    run_dir = run_dir or settings.job_dir(job_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    team_id = team_id or _team_of(settings, job_id)
    device = resolve_device(device)

    def progress(start: float, share: float) -> Callable[[float], None]:
        def report(fraction: float) -> None:
            report_progress(min(1.0, start + share * fraction))
            if should_stop():
                raise TrainingCancelled("diagnosis stopped on request")

        return report

    source = spec.source
    if isinstance(source, UploadSource):
        x, labels = load_upload(settings, team_id, source.upload_id)
        lid_progress = progress(0.0, 1.0)
    else:
        x, labels = extract_job_features(
            settings, team_id, source, device=device, progress=progress(0.0, EXTRACT_SHARE)
        )
        lid_progress = progress(EXTRACT_SHARE, 1.0 - EXTRACT_SHARE)

    n = x.shape[0]
    too_big = [k for k in spec.k if k >= n]
    if too_big:
        raise UserError(
            f"k={max(too_big)} needs more than {max(too_big)} points but the representation"
            f" has {n}; use smaller k",
            code="invalid_spec",
        )
    log.info(
        "diagnosing %d x %d embeddings on %s: k=%s estimators=%s reference=%s",
        n,
        x.shape[1],
        device,
        spec.k,
        spec.estimators,
        spec.reference.mode,
    )
    report = diagnose_embeddings(
        x,
        k=spec.k,
        estimators=spec.estimators,
        labels=labels,
        reference=spec.reference.mode,
        reference_size=spec.reference.size,
        nprobe=spec.reference.nprobe,
        seed=spec.seed,
        collapse_threshold=spec.collapse_threshold,
        device=device,
        progress=lid_progress,
    )
    del x
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    log.info("diagnosis done in %s", {k: round(v, 2) for k, v in report.seconds.items()})

    arrays = report.lid_arrays()
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    lids_path = run_dir / LIDS_ARTIFACT
    _atomic_write(lids_path, lambda f: np.savez(f, allow_pickle=False, **arrays))
    hist_path = run_dir / HISTOGRAM_ARTIFACT
    hist = json.dumps(report.histogram_data(), allow_nan=False, default=_none_for_nan)
    _atomic_write(hist_path, lambda f: f.write(hist.encode()))
    summary = report.summary()
    summary["seconds"] = {k: round(v, 3) for k, v in report.seconds.items()}
    summary["device"] = device
    return summary, [
        (LIDS_ARTIFACT, lids_path, "application/x-npz"),
        (HISTOGRAM_ARTIFACT, hist_path, "application/json"),
    ]


def _none_for_nan(value: Any) -> Any:
    raise TypeError(f"not JSON-serialisable: {value!r}")


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    # A hidden temporary name: the runner never lists it as an artifact.
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _team_of(settings: Settings, job_id: str) -> str:
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise UserError(f"job {job_id} does not exist", code="job_missing")
        return job.team_id


# --------------------------------------------------------------------------- uploads


def load_upload(
    settings: Settings, team_id: str, upload_id: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """The team's uploaded embeddings (a read-only memmap for ``.npy``) and labels."""
    with session_scope(settings.database_url) as s:
        upload = s.scalars(
            select(Upload).where(Upload.id == upload_id, Upload.team_id == team_id)
        ).first()
        path = Path(upload.path) if upload is not None else None
    if path is None:
        raise UserError(
            f"no upload {upload_id} in your team; upload embeddings with POST /v1/uploads",
            code="upload_missing",
        )
    if not path.is_file():
        raise UserError(
            f"the file of upload {upload_id} is gone from the server; upload it again",
            code="upload_missing",
        )
    try:
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False), None
        with np.load(path, allow_pickle=False) as z:
            names = [name for name in z.files if name != "labels"]
            key = "embeddings" if "embeddings" in z.files else names[0]
            labels = z["labels"] if "labels" in z.files else None
            return z[key], labels
    except (ValueError, OSError, IndexError) as exc:
        raise UserError(
            f"upload {upload_id} cannot be read as embeddings: {exc}", code="invalid_embeddings"
        ) from exc


# --------------------------------------------------------------------------- pretrain jobs


def _backbone_path(settings: Settings, team_id: str, source_job_id: str) -> Path:
    with session_scope(settings.database_url) as s:
        job = s.scalars(select(Job).where(Job.id == source_job_id, Job.team_id == team_id)).first()
        if job is None or job.kind != "pretrain":
            raise UserError(
                f"no pretrain job {source_job_id} in your team", code="source_job_missing"
            )
        if job.state != JobState.SUCCEEDED.value:
            raise UserError(
                f"job {source_job_id} is {job.state}; diagnose needs a succeeded pretrain job",
                code="source_job_not_succeeded",
            )
        artifact = s.scalars(
            select(Artifact).where(Artifact.job_id == job.id, Artifact.name == "backbone.pt")
        ).first()
        path = Path(artifact.path) if artifact is not None else None
    path = path or settings.job_dir(source_job_id) / "backbone.pt"
    if not path.is_file():
        raise UserError(
            f"pretrain job {source_job_id} left no backbone.pt to diagnose",
            code="backbone_missing",
        )
    return path


def extract_job_features(
    settings: Settings,
    team_id: str,
    source: JobSource,
    *,
    device: str,
    progress: Callable[[float], None],
) -> tuple[Any, np.ndarray]:
    """Backbone features of the dataset's held-out split, and its labels."""
    from ldreg.data import build_datasets, make_eval_loader
    from ldreg.evaluation import extract_features
    from ldreg.train import load_backbone

    path = _backbone_path(settings, team_id, source.job_id)
    backbone, pretrain_spec = load_backbone(path, device)
    dataset = source.dataset
    if dataset.image_size is None and pretrain_spec.dataset.image_size is not None:
        # The backbone saw images of this size in training (a ViT needs exactly it).
        dataset = dataset.model_copy(update={"image_size": pretrain_spec.dataset.image_size})
    bundle = build_datasets(dataset, data_root=settings.data_root, seed=pretrain_spec.seed)
    loader = make_eval_loader(
        bundle.val, mean=bundle.mean, std=bundle.std, batch_size=EXTRACT_BATCH_SIZE
    )
    total = max(1, len(loader))

    def batches():
        # Progress and cancellation between batches, around the library's loop.
        for i, batch in enumerate(loader):
            yield batch
            progress((i + 1) / total)

    features, labels = extract_features(backbone, batches(), device)
    del backbone
    return features, labels.numpy()
