"""Who runs next on which GPUs: the scheduling policy, pure and deterministic.

This module decides; it stores nothing. It imports only the standard library (no
database, no torch, no settings), so the API, the worker's claim, the sweeper, the
tests and ``benchmarks/sim_scheduler.py`` all run the same rules. Times are plain
floats in seconds (epoch seconds in the service, simulated seconds in the benchmark);
every function takes ``now`` instead of reading a clock.

The inputs
----------
- :class:`JobRequest`: a queued job: its team, GPUs (and host memory, optional), an
  integer priority (higher runs first; 0 is normal), whether it may be preempted, when
  it was submitted (a preempted job keeps its original ``submitted_at``, so it resumes
  near the front of the line), optionally the queue it must run on and its expected
  run time (only ``explain_queue`` uses that).
- :class:`RunningJob`: a job holding GPUs on a worker, with its expected remaining
  time when known (the service measures an ETA from progress: ``progress_eta_seconds``).
- :class:`WorkerCapacity`: a machine: total GPUs and memory, the queues it serves, and
  what is free now (derived from the running jobs when left ``None``).
- ``weights``: team → weight (its entitled share is proportional; missing teams 1.0).
- :class:`Usage`: decayed GPU-seconds per team (below).
- :class:`SchedulingPolicy`: the knobs.

The rules
---------
1. **Fit.** A job is a candidate for a worker only if it fits what is free there now:
   ``gpus <= free_gpus``, ``memory_gb <= free memory`` when both are known, and the
   worker serves the job's queue. A job that fits no worker even when empty is refused
   at submission (:func:`fits_anywhere`) and ignored by the scheduler.
2. **Order.** Candidates are ranked by priority (higher first), then by fair share,
   then by age (older first), then by id (determinism). Priority is global, as in
   Kueue's ``WorkloadPriorityClass`` ordering inside a ClusterQueue.
3. **Fair share.** A team's key is its *effective usage per unit weight*::

       key(team) = (U(team, now) + in_progress · running_gpus(team)) / weight(team)

   ``U`` is decayed GPU-seconds, Slurm's multifactor fair-share usage with its
   ``PriorityDecayHalfLife`` (slurm.conf; Slurm's default is 7 days): each GPU-second
   counts ``2^(-age/half_life)``, and a running job's GPU-seconds are counted as they
   accrue, as Slurm charges running jobs every ``PriorityCalcPeriod``. The second term
   charges the GPUs a team holds *right now* (``in_progress`` seconds per GPU,
   by default ``half_life / ln 2``: the usage a GPU held for ever would settle at),
   so a start moves the team back at once and one team cannot take every free GPU in a
   burst before its usage catches up; the next pick goes to another team (round-robin
   for equal weights, starts in proportion to weights under contention). At steady
   state a team holding ``g`` GPUs has ``U = g · half_life / ln 2``, so equal keys mean
   equal ``g / weight``: the weighted max-min fair allocation (Bertsekas & Gallager,
   *Data Networks*, §6.5.2; Determined's fair-share scheduler likewise divides a
   pool's slots among active jobs in proportion to their weights). Lower key = further below its
   share = served first. Ordering teams by usage/shares is also what Slurm's Fair Tree
   does at one level of the tree (``LevelFS = shares / usage``, higher first).
4. **Reservations: no starvation, and fair share for big jobs.** Small jobs would
   otherwise fill every GPU the moment it frees, and a job needing a whole machine
   would wait for ever (or, under fair share, its team would fall behind its share for
   as long as its jobs wait for room). So some queued jobs hold a *reservation* on one
   worker: a job larger than the smallest job queued (one of the smallest size starts
   at the next free GPU anyway when it ranks first) that

   a. has waited at least ``reserve_after_seconds`` (starvation), or
   b. belongs to a team holding less than its weighted max-min share of the GPUs
      (water-filling over the teams' running and queued demand, :func:`fair_allocation`)
      once the jobs reserved before it are counted (fair share).

   Jobs are taken in rank order (rule 2) and each gets, among the workers able to hold
   it and not yet reserved, the one expected to have room soonest (from the running
   jobs' expected remaining times), else the one with the most free GPUs, else by id;
   at most ``reserved_fraction`` of the workers drain at once. A reserved worker
   starts nothing that would delay its job: only that job, jobs of strictly higher
   priority, or jobs that fit in the GPUs and memory the reservation leaves
   (``free − need``); every other worker backfills freely. This is EASY backfilling
   (Lifka 1995; Slurm's ``sched/backfill`` holds such reservations for its top jobs)
   restricted to one machine, since a job never spans machines, and extended to fair
   share much as Kueue's fair sharing admits first from the ClusterQueue with the
   lowest share. Once a job is the first in that order it cannot starve: its worker starts
   nothing that takes room from it, so that worker's free GPUs only grow (and the
   choice moves only to a worker with more free GPUs or earlier expected room), growing
   each time a job ends there; jobs are finite. And a waiting job becomes first:
   higher-priority work aside, the teams ranked ahead of it accrue usage as they run
   while its team's decays. The reservation survives the moment its worker has room,
   so a drained worker goes to the job it was drained for, not to whichever job ranks
   first there.
5. **Preemption** (:func:`preemption_plan`). A queued job that fits nowhere may stop
   running jobs of strictly lower priority that were submitted as preemptible; never
   a non-preemptible job, never one of equal or higher priority. On each worker that
   could hold the job, victims are taken lowest priority first, then most recently
   started (least work lost), until the job fits; victims found unnecessary are then
   put back, most costly first. The cheapest worker's set wins (highest victim
   priority, then GPU-seconds lost, then number of victims). These are Kueue's rules
   (``withinClusterQueue: LowerPriority``; candidates ordered by priority, then most
   recent start, then the minimal set). A preempted job goes back to the queue with
   its ``submitted_at`` and resumes from its checkpoint.
6. **FCFS** (``SchedulingPolicy(fcfs=True)``): today's single FIFO, for comparison:
   the oldest queued job is the only candidate; if it does not fit the asking worker,
   that worker waits (head-of-line blocking). No priority, no fair share, no
   preemption.

Decayed usage, exactly
----------------------
Usage decays continuously with rate ``λ = ln 2 / half_life`` (``2^(-dt/half_life)``
over ``dt``); a running job adds ``gpus`` GPU-seconds per second. Between events the
running set is constant, so ``du/dt = g − λu`` integrates in closed form::

    u(t + dt) = u(t) · 2^(-dt/h) + g · (h / ln 2) · (1 − 2^(-dt/h))            (step)

and the contribution, observed at ``now``, of a job holding ``g`` GPUs from ``s`` to
``e <= now`` is::

    ∫_s^e g · 2^(-(now - x)/h) dx = g · (h / ln 2) · (2^(-(now - e)/h) − 2^(-(now - s)/h))

Both are exact (tests check them against a fine-step numerical integral), and the
first is the second applied to one interval, so the service can keep one row per team
(``Usage.settled`` as of ``Usage.as_of``), add each finished or preempted run with
:meth:`Usage.add_interval`, and let :meth:`Usage.at` add the running jobs' accrual so
far: no periodic job is needed.

How the worker's claim calls it
-------------------------------
A worker with free GPUs claims in one transaction, after a lock that serialises claims
(``SELECT ... FOR UPDATE`` on one scheduler row, or ``pg_advisory_xact_lock``), so two
workers never decide on the same snapshot::

    policy = SchedulingPolicy()                       # or from settings
    usage = Usage(policy.half_life_seconds, {r.team_id: r.value for r in usage_rows},
                  as_of=usage_rows_as_of)             # one row per team
    workers = [WorkerCapacity(w.id, w.gpus, w.memory_gb, tuple(w.queues))
               for w in live_workers]                 # free GPUs: derived from running
    queued = [JobRequest(j.id, j.team_id, j.gpus, j.memory_gb, j.priority,
                         j.preemptible, j.submitted_at.timestamp(), j.queue)
              for j in queued_rows]
    running = [RunningJob(j.id, j.team_id, j.gpus, j.priority, j.preemptible,
                          j.run_started_at.timestamp(), j.worker, j.memory_gb,
                          j.progress_eta_seconds)
               for j in running_rows]
    me = next(w for w in workers if w.id == worker_id)
    job = next_job(me, queued, running, usage, weights, now, policy, workers=workers)
    if job is not None:
        claim_job(session=session, job_id=job.id, worker=worker_id)
    else:
        plan = next_preemption(queued, running, workers, usage, weights, now, policy)
        if plan is not None:
            ...  # flag plan.preempt for hand-back (like a SIGTERM: the attempt is not
            ...  # counted); plan.worker's next claim then finds plan.job_id first

``RunningJob.started_at`` is the start of the *current* run (a resumed job starts a new
run), not the job's first start. When a run ends (finished, failed, cancelled,
preempted, lost), the same transaction charges it with ``usage.settle(run, ended_at)``
and stores ``usage.settled`` and ``usage.as_of``. The API calls :func:`fits_anywhere`
at submission (a 422 with its message) and :func:`explain_queue` for the visible queue.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

DAY_SECONDS = 86400.0
# Slurm's PriorityDecayHalfLife default: usage from a week ago counts half. Fairness
# over about a week: a team that used little lately is served first, yet a busy
# morning is not forgotten by the afternoon. (The day-long simulation passes 2 hours,
# so that its day holds several half-lives.)
DEFAULT_HALF_LIFE_SECONDS = 7 * DAY_SECONDS
LN2 = math.log(2.0)
_EPS = 1e-9
# explain_queue's forward simulation puts events of unknown time this far ahead.
_UNKNOWN = 1e9


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class JobRequest:
    """A queued job. ``priority``: higher first, 0 normal. ``submitted_at`` is kept
    across preemptions. ``queue``: None runs on any worker. ``expected_seconds``: the
    run time if known (only the queue's start estimates use it)."""

    id: str
    team: str
    gpus: int
    memory_gb: float | None = None
    priority: int = 0
    preemptible: bool = False
    submitted_at: float = 0.0
    queue: str | None = None
    expected_seconds: float | None = None


@dataclass(frozen=True)
class RunningJob:
    """A job holding GPUs on ``worker`` since ``started_at`` (this run).
    ``expected_remaining_seconds`` as of the call's ``now``; None when unknown."""

    id: str
    team: str
    gpus: int
    priority: int
    preemptible: bool
    started_at: float
    worker: str
    memory_gb: float | None = None
    expected_remaining_seconds: float | None = None


@dataclass(frozen=True)
class WorkerCapacity:
    """A machine. ``queues`` empty: it serves every queue. ``free_gpus`` /
    ``free_memory_gb`` None: derived from the running jobs placed on it."""

    id: str
    gpus: int
    memory_gb: float | None = None
    queues: tuple[str, ...] = ()
    free_gpus: int | None = None
    free_memory_gb: float | None = None


@dataclass(frozen=True)
class SchedulingPolicy:
    """The scheduler's knobs.

    - ``half_life_seconds``: usage decay (Slurm's ``PriorityDecayHalfLife``), 7 days
      as in Slurm: fairness over about a week, so a team that used little lately comes
      first, and within a day the in-progress term (below) dominates, which keeps the
      instantaneous split close to the weighted shares (the day-long simulation stays
      within 3.4 points with it; it runs 2 hours so that its day holds several).
    - ``in_progress_seconds``: usage charged per GPU a team holds now; None means
      ``half_life / ln 2``, the level a GPU held for ever settles at (rule 3 above).
    - ``reserve_after_seconds``: how long a job waits before a worker drains for it
      whatever its team's share (rule 4a). 30 minutes: long enough that ordinary
      churn usually makes room first, short next to the hours a drain can take.
    - ``reserved_fraction``: at most this fraction of the workers drain at once
      (at least one). A quarter: in ``benchmarks/sim_scheduler.py`` (six seeds) an
      eighth left the team of 8-GPU jobs up to 5.6 points below its share, a quarter
      kept every team within 2.7 points, a half did no better (3.1).
    - ``fair_share_reservations``: rule 4b (off: only starvation reservations).
    - ``preemption``: whether ``preemption_plan`` proposes anything.
    - ``fcfs``: today's single FIFO instead (rule 6).
    - ``assumed_job_seconds``: run time assumed, for ordering only, where
      ``explain_queue`` knows none (its estimates are None there).
    """

    half_life_seconds: float = DEFAULT_HALF_LIFE_SECONDS
    in_progress_seconds: float | None = None
    reserve_after_seconds: float = 1800.0
    reserved_fraction: float = 0.25
    fair_share_reservations: bool = True
    preemption: bool = True
    fcfs: bool = False
    assumed_job_seconds: float = 3600.0

    def __post_init__(self) -> None:
        if not self.half_life_seconds > 0:
            raise ValueError("half_life_seconds must be positive (math.inf: no decay)")
        if self.in_progress_seconds is not None and self.in_progress_seconds < 0:
            raise ValueError("in_progress_seconds must be >= 0")
        if self.reserve_after_seconds < 0:
            raise ValueError("reserve_after_seconds must be >= 0")
        if not 0 <= self.reserved_fraction <= 1:
            raise ValueError("reserved_fraction must be between 0 and 1")

    def max_reserved(self, workers: int) -> int:
        """How many of ``workers`` may drain at once: ``reserved_fraction`` of them,
        at least one (none when the fraction is 0)."""
        if self.reserved_fraction == 0 or workers == 0:
            return 0
        return max(1, math.floor(self.reserved_fraction * workers + _EPS))

    @property
    def in_progress(self) -> float:
        if self.in_progress_seconds is not None:
            return self.in_progress_seconds
        if math.isinf(self.half_life_seconds):
            return DAY_SECONDS
        return self.half_life_seconds / LN2

    def new_usage(self, as_of: float = 0.0) -> Usage:
        return Usage(half_life_seconds=self.half_life_seconds, as_of=as_of)


DEFAULT_POLICY = SchedulingPolicy()


# --------------------------------------------------------------------- usage decay


def decay_factor(dt: float, half_life_seconds: float) -> float:
    """``2^(-dt/half_life)``: what one GPU-second is worth ``dt`` seconds later."""
    if math.isinf(half_life_seconds):
        return 1.0
    return math.exp(-LN2 * max(dt, 0.0) / half_life_seconds)


def accrued(gpus: float, start: float, end: float, now: float, half_life_seconds: float) -> float:
    """Decayed GPU-seconds, as seen at ``now``, of ``gpus`` GPUs held from ``start`` to
    ``end`` (clipped to ``now``): ``g·(h/ln2)·(2^(-(now-end)/h) − 2^(-(now-start)/h))``."""
    end = min(end, now)
    if end <= start:
        return 0.0
    if math.isinf(half_life_seconds):
        return gpus * (end - start)
    lam = LN2 / half_life_seconds
    # = g/λ · e^{-λ(now-end)} · (1 - e^{-λ(end-start)}), with expm1 for short runs.
    return gpus / lam * math.exp(-lam * (now - end)) * -math.expm1(-lam * (end - start))


@dataclass
class Usage:
    """Decayed GPU-seconds per team.

    ``settled`` holds finished (or preempted) runs, decayed to ``as_of``; running jobs
    are not in it: :meth:`at` adds what they accrued so far, so a stored ``Usage`` needs
    updating only when a run ends (:meth:`add_interval`). :meth:`step` is the same
    closed form applied to a constant running set over ``dt`` (for simulations that
    advance time in steps). Never negative; decays towards 0 when a team is idle.
    """

    half_life_seconds: float = DEFAULT_HALF_LIFE_SECONDS
    settled: dict[str, float] = field(default_factory=dict)
    as_of: float = 0.0

    def copy(self) -> Usage:
        return Usage(self.half_life_seconds, dict(self.settled), self.as_of)

    def decayed(self, now: float) -> dict[str, float]:
        """``settled`` decayed to ``now`` (not stored)."""
        f = decay_factor(now - self.as_of, self.half_life_seconds)
        return {team: value * f for team, value in self.settled.items()}

    def at(self, now: float, running: Iterable[RunningJob] = ()) -> dict[str, float]:
        """Each team's usage at ``now``: settled runs, decayed, plus the running jobs'
        GPU-seconds so far (decayed too)."""
        values = self.decayed(now)
        for job in running:
            values[job.team] = values.get(job.team, 0.0) + accrued(
                job.gpus, job.started_at, now, now, self.half_life_seconds
            )
        return values

    def advance(self, now: float) -> None:
        """Decay ``settled`` to ``now`` (no-op for an earlier ``now``)."""
        if now > self.as_of:
            self.settled = self.decayed(now)
            self.as_of = now

    def add_interval(self, team: str, gpus: float, start: float, end: float) -> None:
        """Charge ``team`` for ``gpus`` GPUs held from ``start`` to ``end`` (a finished
        or preempted run)."""
        self.advance(end)
        self.settled[team] = self.settled.get(team, 0.0) + accrued(
            gpus, start, end, self.as_of, self.half_life_seconds
        )

    def settle(self, job: RunningJob, ended_at: float) -> None:
        """A run ended (finished, failed, cancelled, preempted): charge it."""
        self.add_interval(job.team, job.gpus, job.started_at, ended_at)

    def step(self, dt: float, gpus_by_team: Mapping[str, float]) -> None:
        """Advance by ``dt`` with ``gpus_by_team`` held throughout, exactly:
        ``u ← u·2^(-dt/h) + g·(h/ln2)·(1 − 2^(-dt/h))``."""
        f = decay_factor(dt, self.half_life_seconds)
        for team in set(self.settled) | set(gpus_by_team):
            self.settled[team] = self.settled.get(team, 0.0) * f + accrued(
                gpus_by_team.get(team, 0.0), 0.0, dt, dt, self.half_life_seconds
            )
        self.as_of += dt


# ------------------------------------------------------------------------- fitting


def _weight(weights: Mapping[str, float], team: str) -> float:
    w = weights.get(team, 1.0)
    if not w > 0:
        raise ValueError(f"team {team!r}: weight must be positive, got {w}")
    return float(w)


def _serves(worker: WorkerCapacity, job: JobRequest) -> bool:
    return job.queue is None or not worker.queues or job.queue in worker.queues


def can_hold(job: JobRequest, worker: WorkerCapacity) -> bool:
    """Whether ``worker``, empty, could run ``job``."""
    return (
        _serves(worker, job)
        and job.gpus <= worker.gpus
        and (job.memory_gb is None or worker.memory_gb is None or job.memory_gb <= worker.memory_gb)
    )


def fits(job: JobRequest, worker: WorkerCapacity) -> bool:
    """Whether ``job`` fits what is free on ``worker`` now (``free_gpus`` None: all)."""
    free = worker.gpus if worker.free_gpus is None else worker.free_gpus
    mem = worker.memory_gb if worker.free_memory_gb is None else worker.free_memory_gb
    return (
        _serves(worker, job)
        and job.gpus <= free
        and (job.memory_gb is None or mem is None or job.memory_gb <= mem)
    )


@dataclass(frozen=True)
class FitCheck:
    """:func:`fits_anywhere`'s answer: truthy when some worker can hold the job;
    otherwise ``message`` says why and names the largest worker."""

    ok: bool
    message: str | None = None

    def __bool__(self) -> bool:
        return self.ok


def _gpus(n: int | float) -> str:
    return f"{n:g} GPU" if n == 1 else f"{n:g} GPUs"


def fits_anywhere(job: JobRequest, workers: Sequence[WorkerCapacity]) -> FitCheck:
    """Whether any worker, empty, can hold ``job`` (the API refuses it otherwise, at
    submission, with this message)."""
    if any(can_hold(job, w) for w in workers):
        return FitCheck(True)
    if not workers:
        return FitCheck(False, "no worker is registered")
    serving = [w for w in workers if _serves(w, job)]
    if not serving:
        return FitCheck(False, f"no worker serves queue {job.queue!r}")
    largest = min(serving, key=lambda w: (-w.gpus, -(w.memory_gb or 0.0), w.id))
    if job.gpus > largest.gpus:
        return FitCheck(
            False,
            f"no worker can hold {_gpus(job.gpus)}: the largest worker, {largest.id},"
            f" has {_gpus(largest.gpus)}; ask for at most {largest.gpus}",
        )
    roomy = [w for w in serving if w.gpus >= job.gpus]
    biggest = min(roomy, key=lambda w: (-(w.memory_gb or 0.0), -w.gpus, w.id))
    return FitCheck(
        False,
        f"no worker with {_gpus(job.gpus)} can hold {job.memory_gb:g} GB of memory: the"
        f" largest, {biggest.id}, has {biggest.memory_gb:g} GB",
    )


def fair_allocation(
    capacity: float, demands: Mapping[str, float], weights: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Weighted max-min fair split of ``capacity`` among ``demands`` (water-filling):
    every team gets ``min(demand, weight · level)``, the level chosen so the
    allocations sum to ``min(capacity, total demand)``. A team asking for less than its
    weighted share gets all it asks; what it leaves is shared by the others in
    proportion to their weights."""
    weights = weights or {}
    alloc = dict.fromkeys(demands, 0.0)
    active = sorted(
        (t for t, d in demands.items() if d > 0),
        key=lambda t: (demands[t] / _weight(weights, t), t),
    )
    remaining = float(capacity)
    wsum = sum(_weight(weights, t) for t in active)
    for i, team in enumerate(active):
        level = remaining / wsum
        w = _weight(weights, team)
        if demands[team] <= w * level:
            alloc[team] = float(demands[team])
            remaining -= demands[team]
            wsum -= w
            continue
        for rest in active[i:]:
            alloc[rest] = _weight(weights, rest) * level
        break
    return alloc


# ---------------------------------------------------------------- internal state


@dataclass
class _Run:
    id: str
    team: str
    gpus: int
    memory_gb: float | None
    priority: int
    preemptible: bool
    started_at: float
    worker: str
    end: float  # expected end; math.inf when unknown


class _Fleet:
    """Workers with their free resources and running jobs, mutable for look-ahead."""

    def __init__(
        self, workers: Sequence[WorkerCapacity], running: Sequence[RunningJob], now: float
    ) -> None:
        self.workers = {w.id: w for w in workers}
        self.order = sorted(self.workers)
        self.runs: dict[str, list[_Run]] = {w: [] for w in self.order}
        self.free: dict[str, int] = {}
        self.free_mem: dict[str, float | None] = {}
        for r in sorted(running, key=lambda r: (r.worker, r.id)):  # order-independent sums
            end = (
                math.inf
                if r.expected_remaining_seconds is None
                else now + max(r.expected_remaining_seconds, 0.0)
            )
            self.runs.setdefault(r.worker, []).append(
                _Run(
                    r.id,
                    r.team,
                    r.gpus,
                    r.memory_gb,
                    r.priority,
                    r.preemptible,
                    r.started_at,
                    r.worker,
                    end,
                )
            )
        for wid, w in self.workers.items():
            held = sum(r.gpus for r in self.runs[wid])
            self.free[wid] = max(w.gpus - held, 0) if w.free_gpus is None else w.free_gpus
            if w.free_memory_gb is not None:
                self.free_mem[wid] = w.free_memory_gb
            elif w.memory_gb is None:
                self.free_mem[wid] = None
            else:
                self.free_mem[wid] = w.memory_gb - sum(r.memory_gb or 0.0 for r in self.runs[wid])

    def all_runs(self) -> list[_Run]:
        return [r for wid in self.runs for r in self.runs[wid]]

    def fits(self, job: JobRequest, wid: str, gpus_held: int = 0, mem_held: float = 0.0) -> bool:
        w = self.workers[wid]
        mem = self.free_mem[wid]
        return (
            _serves(w, job)
            and job.gpus <= self.free[wid] - gpus_held
            and (job.memory_gb is None or mem is None or job.memory_gb <= mem - mem_held)
        )

    def start(self, job: JobRequest, wid: str, now: float, end: float) -> _Run:
        run = _Run(
            job.id,
            job.team,
            job.gpus,
            job.memory_gb,
            job.priority,
            job.preemptible,
            now,
            wid,
            end,
        )
        self.runs[wid].append(run)
        self.free[wid] -= job.gpus
        mem = self.free_mem[wid]
        if mem is not None and job.memory_gb is not None:
            self.free_mem[wid] = mem - job.memory_gb
        return run

    def stop(self, run: _Run) -> None:
        self.runs[run.worker].remove(run)
        self.free[run.worker] += run.gpus
        mem = self.free_mem[run.worker]
        if mem is not None and run.memory_gb is not None:
            self.free_mem[run.worker] = mem + run.memory_gb

    def room_at(self, job: JobRequest, wid: str, now: float) -> float:
        """When ``job`` would fit on ``wid`` if nothing else started there: now when it
        fits, else the expected end that frees enough (inf when unknown)."""
        if self.fits(job, wid):
            return now
        free = self.free[wid]
        mem = self.free_mem[wid]
        for run in sorted(self.runs[wid], key=lambda r: r.end):
            if math.isinf(run.end):
                return math.inf
            free += run.gpus
            if mem is not None and run.memory_gb is not None:
                mem += run.memory_gb
            if job.gpus <= free and (job.memory_gb is None or mem is None or job.memory_gb <= mem):
                return run.end
        return math.inf


STARVATION = "starvation"
FAIR_SHARE = "fair_share"


@dataclass(frozen=True)
class Reservation:
    """``worker`` drains for ``job``; ``expected_at`` is when it should have room
    (inf when unknown)."""

    job: JobRequest
    worker: str
    expected_at: float
    why: str = "starvation"


def _team_keys(
    usage: Usage,
    runs: Sequence[_Run],
    teams: Iterable[str],
    weights: Mapping[str, float],
    now: float,
    policy: SchedulingPolicy,
) -> dict[str, float]:
    values = usage.decayed(now)
    held: dict[str, int] = defaultdict(int)
    for r in runs:
        held[r.team] += r.gpus
        values[r.team] = values.get(r.team, 0.0) + accrued(
            r.gpus, r.started_at, now, now, usage.half_life_seconds
        )
    tau = policy.in_progress
    return {
        t: (values.get(t, 0.0) + tau * held.get(t, 0)) / _weight(weights, t)
        for t in set(teams) | set(held)
    }


def _rank_key(job: JobRequest, keys: Mapping[str, float]) -> tuple[int, float, float, str]:
    return (-job.priority, keys[job.team], job.submitted_at, job.id)


def _reservations(
    fleet: _Fleet,
    queue: Sequence[JobRequest],
    keys: Mapping[str, float],
    weights: Mapping[str, float],
    now: float,
    policy: SchedulingPolicy,
) -> dict[str, Reservation]:
    """Rule 4: worker id → its reservation."""
    out: dict[str, Reservation] = {}
    cap = policy.max_reserved(len(fleet.order))
    if not queue or cap == 0:
        return out
    # Only a job that smaller ones can overtake needs room kept for it: a job of the
    # smallest size queued starts at the next free GPU whenever it ranks first.
    smallest = min(j.gpus for j in queue)
    held: dict[str, float] = defaultdict(float)
    for run in fleet.all_runs():
        held[run.team] += run.gpus
    share: dict[str, float] = {}
    if policy.fair_share_reservations:
        demand = dict(held)
        for job in queue:
            demand[job.team] = demand.get(job.team, 0.0) + job.gpus
        share = fair_allocation(sum(w.gpus for w in fleet.workers.values()), demand, weights)
    for job in sorted(queue, key=lambda j: _rank_key(j, keys)):
        if len(out) >= cap:
            break
        if job.gpus <= smallest:
            continue
        waited = now - job.submitted_at >= policy.reserve_after_seconds
        under = held[job.team] < share.get(job.team, 0.0) - _EPS
        if not (waited or under):
            continue
        holders = [
            wid for wid in fleet.order if wid not in out and can_hold(job, fleet.workers[wid])
        ]
        if not holders:
            continue
        best = min(holders, key=lambda wid: (fleet.room_at(job, wid, now), -fleet.free[wid], wid))
        why = STARVATION if waited else FAIR_SHARE
        out[best] = Reservation(job, best, fleet.room_at(job, best, now), why)
        held[job.team] += job.gpus
    return out


def _pick(
    fleet: _Fleet,
    wid: str,
    queue: Sequence[JobRequest],
    usage: Usage,
    weights: Mapping[str, float],
    now: float,
    policy: SchedulingPolicy,
) -> JobRequest | None:
    if not queue or fleet.free[wid] <= 0:
        return None
    if policy.fcfs:
        head = min(queue, key=lambda j: (j.submitted_at, j.id))
        return head if fleet.fits(head, wid) else None
    keys = _team_keys(usage, fleet.all_runs(), (j.team for j in queue), weights, now, policy)
    mine = _reservations(fleet, queue, keys, weights, now, policy).get(wid)
    best: JobRequest | None = None
    best_key: tuple[int, float, float, str] | None = None
    for job in queue:
        if not fleet.fits(job, wid):
            continue
        if (
            mine is not None
            and job.id != mine.job.id
            and job.priority <= mine.job.priority
            and not fleet.fits(job, wid, mine.job.gpus, mine.job.memory_gb or 0.0)
        ):
            continue
        key = _rank_key(job, keys)
        if best_key is None or key < best_key:
            best, best_key = job, key
    return best


def _fleet_for(
    worker: WorkerCapacity, workers: Sequence[WorkerCapacity] | None
) -> list[WorkerCapacity]:
    fleet = [w for w in (workers or ()) if w.id != worker.id]
    return [*fleet, worker]


def _schedulable(
    queued: Iterable[JobRequest], workers: Sequence[WorkerCapacity]
) -> list[JobRequest]:
    return [j for j in queued if any(can_hold(j, w) for w in workers)]


# ------------------------------------------------------------------------ public


def next_job(
    worker: WorkerCapacity,
    queued: Sequence[JobRequest],
    running: Sequence[RunningJob],
    usage: Usage,
    weights: Mapping[str, float],
    now: float,
    policy: SchedulingPolicy = DEFAULT_POLICY,
    *,
    workers: Sequence[WorkerCapacity] | None = None,
) -> JobRequest | None:
    """The job ``worker`` should start now, or None (nothing fits, or it drains).

    ``workers``: the whole fleet (``worker`` included or not); reservations and the
    teams' shares of the fleet need it (without it only ``worker`` is known).
    ``running``: every running job, on every worker (fair share counts them all).
    Jobs no worker could ever hold are ignored. Deterministic: the same inputs, in any
    order, give the same job.
    """
    fleet_list = _fleet_for(worker, workers)
    _check_usage(usage, policy)
    fleet = _Fleet(fleet_list, running, now)
    queue = _schedulable(queued, fleet_list)
    return _pick(fleet, worker.id, queue, usage, weights, now, policy)


def reservations(
    queued: Sequence[JobRequest],
    running: Sequence[RunningJob],
    workers: Sequence[WorkerCapacity],
    usage: Usage,
    weights: Mapping[str, float],
    now: float,
    policy: SchedulingPolicy = DEFAULT_POLICY,
) -> list[Reservation]:
    """The reservations in force (rule 4), for display and for tests."""
    if policy.fcfs:
        return []
    _check_usage(usage, policy)
    fleet = _Fleet(workers, running, now)
    queue = _schedulable(queued, workers)
    keys = _team_keys(usage, fleet.all_runs(), (j.team for j in queue), weights, now, policy)
    return list(_reservations(fleet, queue, keys, weights, now, policy).values())


def fair_share_keys(
    queued: Sequence[JobRequest],
    running: Sequence[RunningJob],
    usage: Usage,
    weights: Mapping[str, float],
    now: float,
    policy: SchedulingPolicy = DEFAULT_POLICY,
) -> dict[str, float]:
    """Each team's effective usage per unit weight (rule 3); lower is served first."""
    fleet = _Fleet([], running, now)
    return _team_keys(usage, fleet.all_runs(), (j.team for j in queued), weights, now, policy)


@dataclass(frozen=True)
class PreemptionPlan:
    """Stop ``preempt`` (running job ids) on ``worker`` so that ``job_id`` fits there."""

    job_id: str
    worker: str
    preempt: tuple[str, ...]
    lost_gpu_seconds: float


def preemption_plan(
    job: JobRequest,
    running: Sequence[RunningJob],
    workers: Sequence[WorkerCapacity],
    now: float,
    policy: SchedulingPolicy = DEFAULT_POLICY,
) -> PreemptionPlan | None:
    """Rule 5: the fewest, cheapest running jobs to stop on one worker so ``job``
    fits, or None: when it already fits somewhere, when no worker could hold it, when
    the policy preempts nothing (FCFS, ``preemption=False``), or when no set of
    preemptible jobs of strictly lower priority on one worker frees enough."""
    if policy.fcfs or not policy.preemption:
        return None
    fleet = _Fleet(workers, running, now)
    if any(fleet.fits(job, wid) for wid in fleet.order):
        return None
    best: tuple[tuple[int, float, int, str], PreemptionPlan] | None = None
    for wid in fleet.order:
        if not can_hold(job, fleet.workers[wid]):
            continue
        candidates = sorted(
            (r for r in fleet.runs[wid] if r.preemptible and r.priority < job.priority),
            key=lambda r: (r.priority, -r.started_at, r.id),
        )
        chosen: list[_Run] = []
        for run in candidates:
            if _fits_without(fleet, job, wid, chosen):
                break
            chosen.append(run)
        if not _fits_without(fleet, job, wid, chosen):
            continue
        # Put back any victim the others make unnecessary, the costliest first.
        for run in reversed(list(chosen)):
            rest = [r for r in chosen if r is not run]
            if _fits_without(fleet, job, wid, rest):
                chosen = rest
        lost = sum(r.gpus * max(now - r.started_at, 0.0) for r in chosen)
        cost = (max(r.priority for r in chosen), lost, len(chosen), wid)
        plan = PreemptionPlan(job.id, wid, tuple(r.id for r in chosen), lost)
        if best is None or cost < best[0]:
            best = (cost, plan)
    return None if best is None else best[1]


def _fits_without(fleet: _Fleet, job: JobRequest, wid: str, stopped: Sequence[_Run]) -> bool:
    freed = sum(r.gpus for r in stopped)
    freed_mem = sum(r.memory_gb or 0.0 for r in stopped)
    return fleet.fits(job, wid, -freed, -freed_mem)


def next_preemption(
    queued: Sequence[JobRequest],
    running: Sequence[RunningJob],
    workers: Sequence[WorkerCapacity],
    usage: Usage,
    weights: Mapping[str, float],
    now: float,
    policy: SchedulingPolicy = DEFAULT_POLICY,
) -> PreemptionPlan | None:
    """The plan for the best-ranked queued job that fits nowhere now and can preempt
    its way in (rule 5), or None."""
    if policy.fcfs or not policy.preemption or not running:
        return None
    _check_usage(usage, policy)
    lowest = min(r.priority for r in running)
    queue = [j for j in _schedulable(queued, workers) if j.priority > lowest]
    if not queue:
        return None
    fleet = _Fleet(workers, running, now)
    keys = _team_keys(usage, fleet.all_runs(), (j.team for j in queue), weights, now, policy)
    for job in sorted(queue, key=lambda j: _rank_key(j, keys)):
        plan = preemption_plan(job, running, workers, now, policy)
        if plan is not None:
            return plan
    return None


def _check_usage(usage: Usage, policy: SchedulingPolicy) -> None:
    if usage.half_life_seconds != policy.half_life_seconds:
        raise ValueError(
            f"usage decays with a half-life of {usage.half_life_seconds:g} s but the policy"
            f" says {policy.half_life_seconds:g} s: build it with policy.new_usage()"
        )


# -------------------------------------------------------------------- the queue

STARTING = "starting"
TOO_LARGE = "too_large"
BEHIND_PRIORITY = "behind_priority"
OVER_FAIR_SHARE = "over_fair_share"
WAITING_FOR_GPUS = "waiting_for_gpus"
BEHIND_FAIR_SHARE = "behind_fair_share"
BEHIND_OLDER = "behind_older"


@dataclass(frozen=True)
class QueueEntry:
    """One queued job as the queue shows it.

    ``position``: 1 = the next to start, in the order the scheduler would start them
    (None for a job no worker can hold). ``reason``: why it is not running, in words;
    ``code``: the same as a constant (``STARTING``, ``TOO_LARGE``, ...).
    ``estimated_start_seconds``: from ``now``, from the running jobs' expected
    remaining times and the queued jobs' expected run times; None when that depends on
    a time nobody knows.
    """

    id: str
    position: int | None
    reason: str
    estimated_start_seconds: float | None
    code: str


def ranked(
    queued: Sequence[JobRequest],
    running: Sequence[RunningJob],
    usage: Usage,
    weights: Mapping[str, float],
    now: float,
    policy: SchedulingPolicy = DEFAULT_POLICY,
) -> list[JobRequest]:
    """The queue in the scheduler's preference order, ignoring fit: priority, then
    fair share with each pick charged to its team as it would be once started (so
    equal teams alternate), then age. FCFS: arrival order."""
    if policy.fcfs:
        return sorted(queued, key=lambda j: (j.submitted_at, j.id))
    keys = fair_share_keys(queued, running, usage, weights, now, policy)
    tau = policy.in_progress
    out: list[JobRequest] = []
    by_priority: dict[int, dict[str, list[JobRequest]]] = defaultdict(lambda: defaultdict(list))
    for job in queued:
        by_priority[job.priority][job.team].append(job)
    for priority in sorted(by_priority, reverse=True):
        teams = by_priority[priority]
        for jobs in teams.values():
            jobs.sort(key=lambda j: (j.submitted_at, j.id), reverse=True)  # pop() = oldest
        heap = [(keys[t], jobs[-1].submitted_at, jobs[-1].id, t) for t, jobs in teams.items()]
        heapq.heapify(heap)
        while heap:
            _, _, _, team = heapq.heappop(heap)
            job = teams[team].pop()
            out.append(job)
            keys[team] += tau * job.gpus / _weight(weights, team)
            if teams[team]:
                head = teams[team][-1]
                heapq.heappush(heap, (keys[team], head.submitted_at, head.id, team))
    return out


def explain_queue(
    queued: Sequence[JobRequest],
    running: Sequence[RunningJob],
    workers: Sequence[WorkerCapacity],
    usage: Usage,
    weights: Mapping[str, float],
    now: float,
    policy: SchedulingPolicy = DEFAULT_POLICY,
) -> list[QueueEntry]:
    """Every queued job's position, why it waits, and when it should start.

    Positions and estimates come from running this policy forward: running jobs end
    after their ``expected_remaining_seconds``, started jobs after their
    ``expected_seconds``; where either is unknown the look-ahead goes on with
    ``policy.assumed_job_seconds`` for the order only, and every start that depends
    on it has no estimate. The reason is the first that holds, in this order:

    - ``"no worker can hold N GPUs ..."``: never runs (refuse it at submission);
    - ``"starting: a worker has room for it"``: it starts at the next claim;
    - ``"behind higher-priority jobs"``: a job of higher priority comes first;
    - ``"team over its fair share"``: its team holds at least its weighted max-min
      share of the GPUs while another team with queued jobs holds less than its own;
    - ``"waiting for N GPUs to free on a worker"``: it holds a reservation (the
      worker is named) or it is first in line; N more must free on the worker closest
      to having room;
    - ``"behind older jobs of teams with less usage"``: others come first by fair
      share or age (FCFS: ``"behind older jobs"``).

    Entries are sorted by position, the jobs that never run last.
    """
    _check_usage(usage, policy)
    entries: dict[str, QueueEntry] = {}
    queue: list[JobRequest] = []
    for job in queued:
        check = fits_anywhere(job, workers)
        if check:
            queue.append(job)
        else:
            entries[job.id] = QueueEntry(job.id, None, check.message or "", None, TOO_LARGE)
    starts = _look_ahead(queue, running, workers, usage, weights, now, policy)
    order = sorted(queue, key=lambda j: (starts[j.id][0], starts[j.id][1]))
    preference = ranked(queue, running, usage, weights, now, policy)
    fleet = _Fleet(workers, running, now)
    held: dict[str, int] = defaultdict(int)
    demand: dict[str, float] = defaultdict(float)
    for run in fleet.all_runs():
        held[run.team] += run.gpus
        demand[run.team] += run.gpus
    for job in queue:
        demand[job.team] += job.gpus
    share = fair_allocation(sum(w.gpus for w in workers), demand, weights)
    under = {t for t in demand if held[t] < share[t] - _EPS and demand[t] > held[t]}
    over = {t for t in demand if held[t] >= share[t] - _EPS}
    reserved: dict[str, Reservation] = {}
    if not policy.fcfs:
        keys = _team_keys(usage, fleet.all_runs(), (j.team for j in queue), weights, now, policy)
        reserved = {
            r.job.id: r for r in _reservations(fleet, queue, keys, weights, now, policy).values()
        }
    drained = {r.worker: r for r in reserved.values()}
    index = {j.id: i for i, j in enumerate(preference)}
    for position, job in enumerate(order, start=1):
        start, _ = starts[job.id]
        estimate = None if start >= now + _UNKNOWN / 2 else max(start - now, 0.0)
        ahead = preference[: index[job.id]]
        code, reason = _reason(
            job, ahead, over, under, fleet, reserved, drained, now, start, policy
        )
        entries[job.id] = QueueEntry(job.id, position, reason, estimate, code)
    return sorted(
        entries.values(),
        key=lambda e: (e.position is None, e.position or 0, e.id),
    )


def _reason(
    job: JobRequest,
    ahead: Sequence[JobRequest],
    over: set[str],
    under: set[str],
    fleet: _Fleet,
    reserved: Mapping[str, Reservation],
    drained: Mapping[str, Reservation],
    now: float,
    start: float,
    policy: SchedulingPolicy,
) -> tuple[str, str]:
    if start <= now:
        return STARTING, "starting: a worker has room for it"
    if policy.fcfs:
        if ahead:
            return BEHIND_OLDER, "behind older jobs"
    else:
        if any(j.priority > job.priority for j in ahead):
            return BEHIND_PRIORITY, "behind higher-priority jobs"
        if job.team in over and under - {job.team} and any(j.team != job.team for j in ahead):
            return OVER_FAIR_SHARE, "team over its fair share"
    if job.id in reserved:
        wid = reserved[job.id].worker
        missing = job.gpus - fleet.free[wid]
        return WAITING_FOR_GPUS, (
            f"waiting for {_gpus(max(missing, 1))} to free on a worker ({wid} is reserved for it)"
        )
    if ahead:
        return BEHIND_FAIR_SHARE, "behind older jobs of teams with less usage"
    # First in line: what it lacks on the worker closest to holding it (a drained
    # worker keeps its reserved job's GPUs).
    room = []
    for wid in fleet.order:
        if can_hold(job, fleet.workers[wid]):
            free = fleet.free[wid]
            r = drained.get(wid)
            if r is not None and job.priority <= r.job.priority:
                free -= r.job.gpus
            room.append(free)
    missing = job.gpus - max(room, default=0)
    if missing <= 0:
        return WAITING_FOR_GPUS, "waiting for memory to free on a worker"
    return WAITING_FOR_GPUS, f"waiting for {_gpus(missing)} to free on a worker"


def _look_ahead(
    queue: Sequence[JobRequest],
    running: Sequence[RunningJob],
    workers: Sequence[WorkerCapacity],
    usage: Usage,
    weights: Mapping[str, float],
    now: float,
    policy: SchedulingPolicy,
) -> dict[str, tuple[float, int]]:
    """Run the policy forward: job id → (start time, start order). Unknown ends are
    moved ``_UNKNOWN`` seconds ahead, keeping their order."""
    fleet = _Fleet(workers, running, now)
    horizon = now + _UNKNOWN
    for run in fleet.all_runs():
        if math.isinf(run.end):
            run.end = horizon + policy.assumed_job_seconds
    virtual = usage.copy()
    waiting = list(queue)
    starts: dict[str, tuple[float, int]] = {}
    t = now
    while waiting:
        started = True
        while started and waiting:
            started = False
            for wid in sorted(fleet.order, key=lambda w: (fleet.free[w], w)):
                while waiting:
                    job = _pick(fleet, wid, waiting, virtual, weights, t, policy)
                    if job is None:
                        break
                    waiting.remove(job)
                    starts[job.id] = (t, len(starts))
                    run_time = job.expected_seconds
                    if run_time is None:
                        end = max(t, horizon) + policy.assumed_job_seconds
                    else:
                        end = t + run_time
                    fleet.start(job, wid, t, end)
                    started = True
        if not waiting:
            break
        runs = fleet.all_runs()
        if not runs:
            break  # nothing will ever free (cannot happen for schedulable jobs)
        first = min(runs, key=lambda r: (r.end, r.id))
        t = max(t, first.end)
        for run in [r for r in runs if r.end <= t]:
            fleet.stop(run)
            virtual.add_interval(run.team, run.gpus, run.started_at, run.end)
    for job in waiting:
        starts[job.id] = (math.inf, len(starts))
    return starts
