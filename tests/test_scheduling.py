"""The scheduling policy (service/scheduling.py): pure functions, no database."""

from __future__ import annotations

import heapq
import importlib.util
import math
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from service.scheduling import (
    BEHIND_FAIR_SHARE,
    BEHIND_OLDER,
    BEHIND_PRIORITY,
    FAIR_SHARE,
    OVER_FAIR_SHARE,
    STARTING,
    STARVATION,
    TOO_LARGE,
    WAITING_FOR_GPUS,
    JobRequest,
    RunningJob,
    SchedulingPolicy,
    Usage,
    WorkerCapacity,
    accrued,
    decay_factor,
    explain_queue,
    fair_allocation,
    fits_anywhere,
    next_job,
    next_preemption,
    preemption_plan,
    ranked,
    reservations,
)

HOUR = 3600.0
POLICY = SchedulingPolicy()


def job(id: str, team: str = "a", gpus: int = 1, at: float = 0.0, **kw) -> JobRequest:
    return JobRequest(id=id, team=team, gpus=gpus, submitted_at=at, **kw)


def run(id: str, team: str, gpus: int, worker: str, started: float = 0.0, **kw) -> RunningJob:
    kw.setdefault("priority", 0)
    kw.setdefault("preemptible", False)
    return RunningJob(id=id, team=team, gpus=gpus, started_at=started, worker=worker, **kw)


def as_running(j: JobRequest, worker: str, now: float) -> RunningJob:
    return RunningJob(j.id, j.team, j.gpus, j.priority, j.preemptible, now, worker, j.memory_gb)


def drain_starts(
    worker: WorkerCapacity,
    queued: list[JobRequest],
    running: list[RunningJob],
    weights: dict[str, float],
    now: float,
    policy: SchedulingPolicy = POLICY,
    usage: Usage | None = None,
) -> list[JobRequest]:
    """Ask ``worker`` for jobs until it gets none; each start is added to ``running``."""
    usage = usage or policy.new_usage()
    started = []
    queue = list(queued)
    while (pick := next_job(worker, queue, running, usage, weights, now, policy)) is not None:
        started.append(pick)
        queue.remove(pick)
        running.append(as_running(pick, worker.id, now))
    return started


# ------------------------------------------------------------------------ fitting


def test_only_jobs_that_fit_the_free_resources_are_candidates():
    no_drain = SchedulingPolicy(reserved_fraction=0)  # reservations: tests below
    queued = [
        job("big", gpus=4, at=0),  # older, but needs more GPUs than are free
        job("hungry", gpus=1, memory_gb=48, at=1),  # more memory than is free
        job("other-queue", gpus=1, queue="cpu", at=2),
        job("fits", gpus=2, memory_gb=16, at=3),
    ]
    worker = WorkerCapacity("w", 8, 64, ("gpu",), free_gpus=2, free_memory_gb=32)
    usage = no_drain.new_usage()
    assert next_job(worker, queued, [], usage, {}, 10.0, no_drain).id == "fits"
    assert next_job(worker, queued[:3], [], usage, {}, 10.0, no_drain) is None
    # A worker with more room takes the older job, on its queue.
    roomy = WorkerCapacity("w", 8, 64, ("gpu", "cpu"), free_gpus=8, free_memory_gb=64)
    assert next_job(roomy, queued, [], usage, {}, 10.0, no_drain).id == "big"


def test_free_gpus_are_derived_from_the_running_jobs_when_not_given():
    no_drain = SchedulingPolicy(reserved_fraction=0)
    worker = WorkerCapacity("w", gpus=8)
    running = [run("r", "a", 6, "w")]
    queued = [job("four", gpus=4, at=0), job("two", gpus=2, at=1)]
    pick = next_job(worker, queued, running, no_drain.new_usage(), {}, 10.0, no_drain)
    assert pick.id == "two"


def test_fits_anywhere_refuses_a_job_larger_than_the_largest_worker_and_names_it():
    workers = [WorkerCapacity("gpu-small", 4), WorkerCapacity("gpu-big", 8)]
    check = fits_anywhere(job("huge", gpus=16), workers)
    assert not check
    assert "no worker can hold 16 GPUs" in check.message
    assert "gpu-big" in check.message and "has 8 GPUs" in check.message
    assert fits_anywhere(job("ok", gpus=8), workers)
    memory = fits_anywhere(job("fat", gpus=2, memory_gb=900), [WorkerCapacity("m", 8, 512)])
    assert not memory and "m" in memory.message and "512 GB" in memory.message
    queue = fits_anywhere(job("q", queue="tpu"), [WorkerCapacity("g", 8, queues=("gpu",))])
    assert not queue and "'tpu'" in queue.message
    # The scheduler ignores such a job instead of blocking on it.
    queued = [job("huge", gpus=16, at=0), job("small", at=1)]
    assert next_job(workers[1], queued, [], POLICY.new_usage(), {}, 5.0).id == "small"


# ----------------------------------------------------------------------- ordering


def test_priority_comes_before_fair_share_which_comes_before_age():
    worker = WorkerCapacity("w", gpus=8, free_gpus=1)
    usage = Usage(POLICY.half_life_seconds, {"heavy": 1e6, "light": 0.0}, as_of=0.0)
    queued = [
        job("light-old", "light", at=0),
        job("light-new", "light", at=50),
        job("heavy-urgent", "heavy", at=90, priority=5),
        job("heavy-old", "heavy", at=-100),
    ]
    pick = lambda q: next_job(worker, q, [], usage, {}, 100.0).id  # noqa: E731
    assert pick(queued) == "heavy-urgent"  # priority first, whatever the usage
    assert pick(queued[:2] + queued[3:]) == "light-old"  # then less usage, not older
    assert pick(queued[:2]) == "light-old"  # then age within equal usage
    order = [j.id for j in ranked(queued, [], usage, {}, 100.0)]
    assert order == ["heavy-urgent", "light-old", "light-new", "heavy-old"]


def test_weights_divide_usage():
    usage = Usage(POLICY.half_life_seconds, {"big": 2e5, "small": 1.5e5}, as_of=0.0)
    queued = [job("s", "small", at=0), job("b", "big", at=1)]
    worker = WorkerCapacity("w", 1)
    assert next_job(worker, queued, [], usage, {}, 1.0).id == "s"
    assert next_job(worker, queued, [], usage, {"big": 2.0}, 1.0).id == "b"


def test_three_equal_teams_submitting_at_once_are_served_round_robin():
    queued = [job(f"{team}-{i}", team, at=0.0) for team in "abc" for i in range(4)]
    worker = WorkerCapacity("w", gpus=9)
    started = drain_starts(worker, queued, [], {}, 10.0)
    teams = [j.team for j in started]
    assert len(teams) == 9
    for rnd in range(3):  # every round of three starts serves each team once
        assert sorted(teams[3 * rnd : 3 * rnd + 3]) == ["a", "b", "c"]
    # Within a team, oldest (then id) first.
    assert [j.id for j in started if j.team == "a"] == ["a-0", "a-1", "a-2"]


def test_weights_two_to_one_give_two_to_one_starts_under_contention():
    queued = [job(f"{team}-{i:02d}", team, at=0.0) for team in ("two", "one") for i in range(40)]
    worker = WorkerCapacity("w", gpus=30)
    started = drain_starts(worker, queued, [], {"two": 2.0, "one": 1.0}, 10.0)
    counts = Counter(j.team for j in started)
    assert counts == {"two": 20, "one": 10}


def test_running_gpus_count_as_usage_in_progress():
    # Team a already holds 8 GPUs (started a second ago: no usage accrued yet), so the
    # free GPU goes to team b even though a's job is older.
    worker = WorkerCapacity("w2", gpus=8)
    running = [run("r", "a", 8, "w1", started=99.0)]
    queued = [job("a-1", "a", at=0), job("b-1", "b", at=50)]
    assert next_job(worker, queued, running, POLICY.new_usage(), {}, 100.0).id == "b-1"


def test_next_job_is_deterministic():
    queued = [
        job(f"j{i}", team=t, gpus=g, at=i % 3)
        for i, (t, g) in enumerate([("a", 1), ("b", 2), ("c", 1), ("a", 4), ("b", 1), ("c", 2)] * 3)
    ]
    workers = [WorkerCapacity("w1", 8, free_gpus=3), WorkerCapacity("w2", 8, free_gpus=5)]
    usage = POLICY.new_usage()
    for w in workers:
        picks = {
            next_job(w, q, [], usage, {}, 9.0, workers=workers[::-1]).id
            for q in (queued, queued[::-1], sorted(queued, key=lambda j: j.team))
        }
        assert len(picks) == 1  # the same answer whatever the order of the inputs


# ---------------------------------------------------------------------- reservations


def _simulate(
    workers: list[WorkerCapacity],
    arrivals: list[tuple[float, JobRequest, float]],
    running: list[tuple[RunningJob, float]],
    policy: SchedulingPolicy,
    weights: dict[str, float],
    until: float,
    stop: Callable[[JobRequest], bool] = lambda j: False,
) -> dict[str, float]:
    """A tiny event loop: arrivals (time, job, duration); returns job id -> start."""
    usage = policy.new_usage()
    free_at: list[tuple[float, str]] = []
    live: dict[str, RunningJob] = {}
    for r, end in running:
        live[r.id] = r
        heapq.heappush(free_at, (end, r.id))
    durations = {j.id: d for _, j, d in arrivals}
    pending = sorted(arrivals, key=lambda a: (a[0], a[1].id))
    queue: list[JobRequest] = []
    starts: dict[str, float] = {}
    t = 0.0
    while t <= until:
        while pending and pending[0][0] <= t:
            queue.append(pending.pop(0)[1])
        for w in workers:
            while True:
                pick = next_job(
                    w, queue, list(live.values()), usage, weights, t, policy, workers=workers
                )
                if pick is None:
                    break
                queue.remove(pick)
                starts[pick.id] = t
                live[pick.id] = as_running(pick, w.id, t)
                heapq.heappush(free_at, (t + durations[pick.id], pick.id))
                if stop(pick):
                    return starts
        nxt = min(free_at[0][0] if free_at else math.inf, pending[0][0] if pending else math.inf)
        if math.isinf(nxt):
            break
        t = nxt
        while free_at and free_at[0][0] <= t:
            _, rid = heapq.heappop(free_at)
            r = live.pop(rid)
            usage.add_interval(r.team, r.gpus, r.started_at, t)
    return starts


def _stream_against_big_job(policy: SchedulingPolicy) -> dict[str, float]:
    """Two 8-GPU workers kept busy by a staggered stream of one-GPU jobs (one ends
    every minute, and a new one is always queued), and one 8-GPU job of another team."""
    workers = [WorkerCapacity("w1", 8), WorkerCapacity("w2", 8)]
    running = [
        (run(f"init-{i}", "small", 1, f"w{1 + i % 2}", started=-60.0 * i), 60.0 * (i + 1))
        for i in range(16)
    ]
    arrivals = [(60.0 * i, job(f"s-{i:04d}", "small", at=60.0 * i), 16 * 60.0) for i in range(600)]
    arrivals.append((0.0, job("big", "big", gpus=8, at=0.0), HOUR))
    return _simulate(workers, arrivals, running, policy, {}, 8 * HOUR, lambda j: j.id == "big")


def test_a_big_job_is_not_starved_by_a_stream_of_small_ones():
    # Without reservations the 8-GPU job never finds a whole worker free.
    never = _stream_against_big_job(
        SchedulingPolicy(reserved_fraction=0.0, fair_share_reservations=False)
    )
    assert "big" not in never
    # The starvation rule alone: a worker drains once it has waited 30 minutes.
    starts = _stream_against_big_job(
        SchedulingPolicy(reserve_after_seconds=1800, fair_share_reservations=False)
    )
    assert 1800 <= starts["big"] <= 1800 + 16 * 60 + 60
    # With fair share, its team holds less than its share, so the drain starts at once.
    fair = _stream_against_big_job(SchedulingPolicy(reserve_after_seconds=1800))
    assert fair["big"] <= 16 * 60 + 60


def test_reservations_name_their_reason_and_hold_the_worker_with_the_soonest_room():
    workers = [WorkerCapacity("w1", 8), WorkerCapacity("w2", 8)]
    running = [
        run("r1", "small", 6, "w1", expected_remaining_seconds=3000),
        run("r2", "small", 7, "w2", expected_remaining_seconds=600),
    ]
    queued = [job("big", "big", gpus=8, at=0.0), job("s", "small", at=0.0)]
    usage = POLICY.new_usage()
    [r] = reservations(queued, running, workers, usage, {}, 100.0)
    assert (r.job.id, r.worker, r.why, r.expected_at) == ("big", "w2", FAIR_SHARE, 700.0)
    # w2 drains: the one-GPU job may not take its free GPU, but w1's is free to use.
    assert next_job(workers[1], queued, running, usage, {}, 100.0, workers=workers) is None
    pick = next_job(workers[0], queued, running, usage, {}, 100.0, workers=workers)
    assert pick.id == "s"
    # A team already at its share (16 of 32 GPUs, the other team asking for more than
    # the rest) waits reserve_after_seconds before a worker drains for it.
    at_share = [*running, run("r3", "big", 8, "w3"), run("r4", "big", 8, "w4")]
    fleet = [*workers, WorkerCapacity("w3", 8), WorkerCapacity("w4", 8)]
    queued_later = [
        job("big", "big", gpus=8, at=90.0),
        *(job(f"s{i}", "small", at=0.0) for i in range(20)),
    ]
    assert reservations(queued_later, at_share, fleet, usage, {}, 100.0) == []
    [late] = reservations(queued_later, at_share, fleet, usage, {}, 90.0 + 1800)
    assert late.why == STARVATION


def test_jobs_that_leave_the_reserved_room_intact_may_backfill_the_drained_worker():
    worker = WorkerCapacity("w", 8, memory_gb=64)
    # 6 GPUs free but only 16 GB: the 4-GPU, 32 GB job waits for memory, with w reserved.
    running = [run("r", "x", 2, "w", memory_gb=48, expected_remaining_seconds=600)]
    reserved = job("wide", "b", gpus=4, memory_gb=32, at=0.0)
    usage = POLICY.new_usage()
    [r] = reservations([reserved, job("one", "c", at=1.0)], running, [worker], usage, {}, 10.0)
    assert (r.job.id, r.worker) == ("wide", "w")

    def pick(*others: JobRequest) -> str | None:
        got = next_job(worker, [reserved, *others], running, usage, {}, 10.0)
        return None if got is None else got.id

    assert pick(job("one", "c", at=1.0)) == "one"  # 6 - 4 free GPUs left for it
    assert pick(job("three", "c", gpus=3, at=1.0)) is None  # would take the reserved room
    assert pick(job("one-8gb", "c", memory_gb=8, at=1.0)) is None  # memory: 16 - 32 < 8
    assert pick(job("vip", "c", gpus=3, at=1.0, priority=5)) == "vip"  # higher priority


# ------------------------------------------------------------------------ preemption


def test_preemption_takes_the_least_loss_preemptible_jobs_on_one_worker():
    workers = [WorkerCapacity("w1", 8), WorkerCapacity("w2", 8)]
    running = [
        run("old-spot", "s", 2, "w1", started=0.0, preemptible=True),
        run("new-spot", "s", 2, "w1", started=500.0, preemptible=True),
        run("pinned", "s", 4, "w1", started=600.0),  # not preemptible
        run("vip", "v", 8, "w2", started=700.0, priority=9, preemptible=True),
    ]
    now = 1000.0
    urgent = job("urgent", "u", gpus=2, at=900.0, priority=5)
    plan = preemption_plan(urgent, running, workers, now)
    assert (plan.worker, plan.preempt) == ("w1", ("new-spot",))  # most recently started
    assert plan.lost_gpu_seconds == 2 * 500.0
    # Four GPUs: both preemptible jobs, never the pinned one nor the higher-priority one.
    plan = preemption_plan(job("u4", "u", gpus=4, priority=5), running, workers, now)
    assert plan.worker == "w1" and set(plan.preempt) == {"old-spot", "new-spot"}
    assert preemption_plan(job("u6", "u", gpus=6, priority=5), running, workers, now) is None
    # Never a job of equal or higher priority.
    assert preemption_plan(job("eq", "u", gpus=2, priority=0), running, workers, now) is None
    # Nothing to do when the job fits somewhere, or in FCFS mode.
    roomy = [WorkerCapacity("w1", 8), WorkerCapacity("w2", 8), WorkerCapacity("w3", 8)]
    assert preemption_plan(urgent, running, roomy, now) is None
    assert preemption_plan(urgent, running, workers, now, SchedulingPolicy(fcfs=True)) is None


def test_preemption_keeps_the_set_minimal_and_prefers_the_lowest_priority():
    workers = [WorkerCapacity("w1", 8), WorkerCapacity("w2", 8)]
    running = [
        # w1: the greedy order (newest first) takes the 1-GPU job, then the 4-GPU one,
        # which alone frees enough: the 1-GPU job is put back.
        run("tiny", "s", 1, "w1", started=900.0, preemptible=True, priority=1),
        run("four", "s", 4, "w1", started=100.0, preemptible=True, priority=1),
        run("rest", "s", 3, "w1", started=0.0),
        # w2: same room, but priority 0 victims: preferred over w1's priority 1.
        run("low", "s", 4, "w2", started=200.0, preemptible=True, priority=0),
        run("keep", "s", 4, "w2", started=0.0),
    ]
    plan = preemption_plan(job("u", "u", gpus=4, priority=5), running, workers, 1000.0)
    assert (plan.worker, plan.preempt) == ("w2", ("low",))
    without_w2 = [r for r in running if r.worker == "w1"]
    plan = preemption_plan(job("u", "u", gpus=4, priority=5), without_w2, workers[:1], 1000.0)
    assert plan.preempt == ("four",)


def test_next_preemption_serves_the_best_ranked_job_that_fits_nowhere():
    workers = [WorkerCapacity("w1", 4)]
    running = [run("spot", "s", 4, "w1", started=0.0, preemptible=True)]
    queued = [job("normal", "a", gpus=2, at=0.0), job("urgent", "b", gpus=2, at=5.0, priority=3)]
    plan = next_preemption(queued, running, workers, POLICY.new_usage(), {}, 10.0)
    assert (plan.job_id, plan.preempt) == ("urgent", ("spot",))
    assert next_preemption(queued[:1], running, workers, POLICY.new_usage(), {}, 10.0) is None


# ------------------------------------------------------------------------ the queue


def test_explain_queue_positions_reasons_and_estimates():
    workers = [WorkerCapacity("w1", 8), WorkerCapacity("w2", 8)]
    running = [
        run("a1", "a", 8, "w1", expected_remaining_seconds=600),
        run("a2", "a", 7, "w2", expected_remaining_seconds=1200),
    ]
    now = 1000.0
    queued = [
        job("huge", "c", gpus=16, at=0.0),
        job("a-more", "a", gpus=1, at=10.0, expected_seconds=60),
        job("b-one", "b", gpus=1, at=20.0, expected_seconds=600),
        job("b-two", "b", gpus=1, at=30.0, expected_seconds=600),
        job("c-urgent", "c", gpus=4, at=40.0, priority=5, expected_seconds=300),
        job("c-later", "c", gpus=2, at=50.0),
    ]
    entries = {
        e.id: e for e in explain_queue(queued, running, workers, POLICY.new_usage(), {}, now)
    }
    assert entries["huge"].code == TOO_LARGE and entries["huge"].position is None
    assert "no worker can hold 16 GPUs" in entries["huge"].reason
    assert entries["huge"].estimated_start_seconds is None
    # One GPU is free on w2: the best-ranked job that fits takes it now. The urgent job
    # ranks first but needs 4: w1 (room in 600 s) is reserved for it.
    assert entries["b-one"].code == STARTING and entries["b-one"].position == 1
    assert entries["b-one"].estimated_start_seconds == 0.0
    assert entries["c-urgent"].code == WAITING_FOR_GPUS
    assert (
        entries["c-urgent"].reason
        == "waiting for 4 GPUs to free on a worker (w1 is reserved for it)"
    )
    assert entries["c-urgent"].estimated_start_seconds == 600.0
    # b-one ends when w1 has room: b-two takes its GPU on w2 then, w1 goes to c-urgent.
    assert (entries["b-two"].position, entries["c-urgent"].position) == (2, 3)
    assert entries["b-two"].estimated_start_seconds == 600.0
    assert entries["b-two"].code == BEHIND_PRIORITY
    assert entries["a-more"].code == BEHIND_PRIORITY
    positions = sorted(e.position for e in entries.values() if e.position is not None)
    assert positions == [1, 2, 3, 4, 5]
    # c-later's run time is unknown but it starts when w1's reserved job does: known.
    assert all(e.estimated_start_seconds is not None for e in entries.values() if e.position)
    # Without the urgent job: team a holds 15 of 16 GPUs, over its share.
    rest = [j for j in queued if j.id not in ("c-urgent", "huge")]
    entries = {e.id: e for e in explain_queue(rest, running, workers, POLICY.new_usage(), {}, now)}
    assert entries["a-more"].code == OVER_FAIR_SHARE
    assert entries["a-more"].reason == "team over its fair share"
    assert entries["b-two"].code == BEHIND_FAIR_SHARE
    assert entries["b-two"].reason == "behind older jobs of teams with less usage"


def test_explain_queue_first_in_line_waits_for_gpus_and_unknown_times_give_no_estimate():
    workers = [WorkerCapacity("w1", 8)]
    running = [run("r", "x", 8, "w1")]  # expected remaining unknown
    queued = [job("b", "b", gpus=2, at=0.0), job("c", "c", gpus=1, at=1.0)]
    entries = explain_queue(queued, running, workers, POLICY.new_usage(), {}, 10.0)
    assert [(e.id, e.position) for e in entries] == [("b", 1), ("c", 2)]
    first, second = entries
    # b's team holds nothing, below its share: w1 is reserved for its 2-GPU job.
    assert first.reason == "waiting for 2 GPUs to free on a worker (w1 is reserved for it)"
    assert first.estimated_start_seconds is None and second.estimated_start_seconds is None
    assert second.code == BEHIND_FAIR_SHARE


def test_explain_queue_in_fcfs_mode():
    fcfs = SchedulingPolicy(fcfs=True)
    workers = [WorkerCapacity("w1", 8)]
    running = [run("r", "x", 6, "w1", expected_remaining_seconds=100)]
    queued = [
        job("head", "a", gpus=4, at=0.0, expected_seconds=50),
        job("small", "b", gpus=1, at=1.0, priority=9),
    ]
    entries = explain_queue(queued, running, workers, fcfs.new_usage(), {}, 10.0, fcfs)
    assert [(e.id, e.code) for e in entries] == [
        ("head", WAITING_FOR_GPUS),
        ("small", BEHIND_OLDER),
    ]
    assert entries[0].estimated_start_seconds == 100.0


# --------------------------------------------------------------------------- FCFS


def test_fcfs_is_strict_first_in_first_out():
    fcfs = SchedulingPolicy(fcfs=True)
    worker = WorkerCapacity("w", 8, free_gpus=2)
    usage = Usage(fcfs.half_life_seconds, {"a": 1e9})
    queued = [
        job("later-urgent", "b", gpus=1, at=5.0, priority=9),
        job("head", "a", gpus=4, at=1.0),
        job("small", "b", gpus=1, at=2.0),
    ]
    # The head does not fit: nothing starts (head-of-line blocking), whatever the
    # priority or the usage of the others.
    assert next_job(worker, queued, [], usage, {}, 10.0, fcfs) is None
    roomy = WorkerCapacity("w", 8, free_gpus=8)
    started = drain_starts(roomy, queued, [], {}, 10.0, fcfs, usage)
    assert [j.id for j in started] == ["head", "small", "later-urgent"]
    assert [j.id for j in ranked(queued, [], usage, {}, 10.0, fcfs)] == [
        "head",
        "small",
        "later-urgent",
    ]
    assert reservations(queued, [], [worker], usage, {}, 1e6, fcfs) == []


# --------------------------------------------------------------------- usage decay


def test_decay_halves_usage_every_half_life():
    h = 3600.0
    assert decay_factor(h, h) == pytest.approx(0.5)
    assert decay_factor(3 * h, h) == pytest.approx(0.125)
    usage = Usage(h, {"a": 100.0}, as_of=0.0)
    assert usage.decayed(2 * h)["a"] == pytest.approx(25.0)
    assert decay_factor(1e9, math.inf) == 1.0


@pytest.mark.parametrize(
    "start,end,now",
    [(0.0, 5000.0, 5000.0), (100.0, 900.0, 20000.0), (0.0, 1.0, 1.0), (3000.0, 40000.0, 50000.0)],
)
def test_the_closed_form_accrual_matches_a_fine_numerical_integral(start, end, now):
    h, gpus = 7200.0, 3
    steps = 200_000
    dx = (end - start) / steps
    # Midpoint rule for ∫ g·2^(-(now-x)/h) dx.
    numeric = sum(gpus * 2 ** (-(now - (start + (i + 0.5) * dx)) / h) * dx for i in range(steps))
    assert accrued(gpus, start, end, now, h) == pytest.approx(numeric, rel=1e-7)


def test_incremental_steps_equal_the_interval_form_and_the_ode():
    h = 1800.0
    stepped = Usage(h)
    intervals = Usage(h)
    # Team a: 4 GPUs for 1000 s, 0 for 500 s, 2 for 2000 s; team b: 1 GPU throughout.
    schedule = [(1000.0, {"a": 4, "b": 1}), (500.0, {"b": 1}), (2000.0, {"a": 2, "b": 1})]
    t = 0.0
    for dt, gpus in schedule:
        stepped.step(dt, gpus)
        for team, g in gpus.items():
            intervals.add_interval(team, g, t, t + dt)
        t += dt
    assert stepped.as_of == intervals.as_of == t
    for team in ("a", "b"):
        assert stepped.settled[team] == pytest.approx(intervals.settled[team], rel=1e-12)
    # Euler on du/dt = g - λu with a small step.
    lam, u, dt_small = math.log(2) / h, 0.0, 0.01
    for dt, gpus in schedule:
        for _ in range(int(dt / dt_small)):
            u += (gpus.get("a", 0) - lam * u) * dt_small
    assert stepped.settled["a"] == pytest.approx(u, rel=1e-4)


def test_usage_at_counts_running_jobs_accrued_so_far():
    h = 3600.0
    usage = Usage(h, {"a": 1000.0}, as_of=0.0)
    running = [run("r", "a", 2, "w", started=0.0), run("q", "b", 1, "w", started=1800.0)]
    now = 3600.0
    values = usage.at(now, running)
    assert values["a"] == pytest.approx(500.0 + accrued(2, 0.0, now, now, h))
    assert values["b"] == pytest.approx(accrued(1, 1800.0, now, now, h))
    # Settling the run afterwards gives the same number.
    usage.settle(running[0], now)
    assert usage.settled["a"] == pytest.approx(values["a"])


def test_a_usage_with_another_half_life_is_refused():
    with pytest.raises(ValueError, match="half-life"):
        next_job(WorkerCapacity("w", 1), [job("j")], [], Usage(60.0), {}, 0.0)


# ----------------------------------------------------------------- fair allocation


def test_fair_allocation_is_weighted_max_min():
    alloc = fair_allocation(10, {"a": 2, "b": 10, "c": 10}, {"c": 3})
    assert alloc["a"] == 2  # asks less than its share: gets it all
    assert alloc["b"] == pytest.approx(2.0) and alloc["c"] == pytest.approx(6.0)
    assert fair_allocation(10, {"a": 3, "b": 4}) == {"a": 3, "b": 4}  # enough for all
    assert fair_allocation(10, {"a": 0, "b": 20}) == {"a": 0.0, "b": 10.0}


# -------------------------------------------------------------------- simulation


def _load_sim():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "sim_scheduler.py"
    spec = importlib.util.spec_from_file_location("sim_scheduler", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sim_scheduler"] = module
    spec.loader.exec_module(module)
    return module


def test_a_small_simulation_is_fairer_than_fcfs_without_lower_utilisation():
    sim = _load_sim()
    T = sim.TeamSpec
    teams = (
        T("sweep", 1, (1,), 40, 0.5, burst=80, burst_at_h=1.0, p_preemptible=1.0),
        T("steady", 1, (1, 2), 45, 0.6, rate=8.0, p_priority=0.1, priority=5),
        T("big", 2, (8,), 90, 0.4, rate=1.5),
    )
    for seed in (1, 3):
        out = sim.compare(seed, teams, hours=6, workers=4)
        fair, fcfs = out["runs"]["fair share"], out["runs"]["fcfs"]
        assert fair["max_deviation_pp"] < fcfs["max_deviation_pp"]
        assert fair["utilisation"] >= fcfs["utilisation"]
        assert sum(fair["share"].values()) == pytest.approx(1.0)
        assert sum(fair["entitled_share"].values()) == pytest.approx(1.0)
        # Every job ran: none starved.
        assert fair["waits"]["all"]["n"] == out["jobs"]
        assert "| utilisation, busy period |" in sim.markdown(out)
