"""Per-step metric points: what the worker's sink writes and when (SQLite, in
process), and how a long series is thinned on read."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

import worker.sink as sink_module
from service.db import migrate, session_scope
from service.execution import claim_job
from service.jobs import thin_indices
from service.models import Job, JobState, Metric, Team, utcnow
from service.settings import Settings
from worker.sink import DatabaseSink, Lease


@pytest.fixture
def running_job(tmp_path: Path) -> tuple[Settings, str, int]:
    settings = Settings(home=tmp_path)
    migrate(settings.database_url)
    with session_scope(settings.database_url) as s:
        team = Team(name="steps")
        s.add(team)
        s.flush()
        job = Job(team_id=team.id, kind="pretrain", spec={}, enqueued_at=utcnow(), attempt=0)
        job.transition(JobState.QUEUED, "submitted")
        s.add(job)
        s.flush()
        job_id = job.id
    with session_scope(settings.database_url) as s:
        attempt = claim_job(session=s, job_id=job_id, worker="w")
    assert attempt == 1
    return settings, job_id, attempt


def rows(settings: Settings, job_id: str, name: str) -> list[tuple[int, int, float]]:
    with session_scope(settings.database_url) as s:
        found = s.execute(
            select(Metric.epoch, Metric.step, Metric.value)
            .where(Metric.job_id == job_id, Metric.name == name)
            .order_by(Metric.step)
        )
        return [tuple(r) for r in found]


def test_step_points_are_batched_and_the_epochs_value_wins_at_its_last_step(
    running_job: tuple[Settings, str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, job_id, attempt = running_job
    monkeypatch.setattr(sink_module, "STEP_FLUSH_SECONDS", 0.0)  # flush at every step
    sink = DatabaseSink(Lease(settings, job_id, attempt))
    sink.on_train_start(start_epoch=1, epochs=2, steps_per_epoch=4)
    for step in (1, 2, 3):
        sink.on_step(epoch=1, step=step, metrics={"loss": float(step), "lr": 0.1})
    assert [r[1] for r in rows(settings, job_id, "loss")] == [1, 2, 3]
    # The epoch's last step waits for the epoch's own rows: nobody reading "steps after
    # the last one I have" can miss them.
    sink.on_step(epoch=1, step=4, metrics={"loss": 4.0, "lr": 0.1})
    assert [r[1] for r in rows(settings, job_id, "loss")] == [1, 2, 3]
    sink.on_epoch_end(epoch=1, step=4, metrics={"loss": 2.5, "knn_acc": 0.5, "lr": 0.1})
    # At the step that ends the epoch, the epoch's value (its mean), not the step's.
    assert rows(settings, job_id, "loss") == [(1, 1, 1.0), (1, 2, 2.0), (1, 3, 3.0), (1, 4, 2.5)]
    assert rows(settings, job_id, "knn_acc") == [(1, 4, 0.5)]
    assert [r[1] for r in rows(settings, job_id, "lr")] == [1, 2, 3, 4]


def test_long_epochs_keep_every_kth_step(
    running_job: tuple[Settings, str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, job_id, attempt = running_job
    monkeypatch.setattr(sink_module, "STEP_POINTS_PER_EPOCH", 5)
    sink = DatabaseSink(Lease(settings, job_id, attempt))
    sink.on_train_start(start_epoch=1, epochs=1, steps_per_epoch=20)
    for step in range(1, 21):
        sink.on_step(epoch=1, step=step, metrics={"loss": float(step)})
    sink.on_epoch_end(epoch=1, step=20, metrics={"loss": 10.5})
    assert [r[1] for r in rows(settings, job_id, "loss")] == [4, 8, 12, 16, 20]
    assert rows(settings, job_id, "loss")[-1][2] == 10.5


def test_thinning_keeps_every_epochs_value_and_spreads_the_rest() -> None:
    epochs = [e for e in range(1, 11) for _ in range(10)]  # 10 epochs of 10 steps
    ends = [9, 19, 29, 39, 49, 59, 69, 79, 89, 99]
    assert thin_indices(epochs, 1000) == list(range(100))
    # Room for only the epochs' values: those, whatever max_points says.
    assert thin_indices(epochs, 10) == ends
    assert thin_indices(epochs, 3) == ends
    kept = thin_indices(epochs, 20)
    assert len(kept) == 20 and set(ends) <= set(kept) and kept[0] == 0
    assert kept == sorted(set(kept))
    # A series with a point per epoch only is never thinned below its epochs.
    assert thin_indices(list(range(1, 51)), 10) == list(range(50))
