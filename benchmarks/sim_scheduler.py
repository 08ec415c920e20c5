"""A day of GPU jobs, scheduled by service/scheduling.py's fair share and by FCFS.

A discrete-event simulation: the same submissions (same seed) run twice on the same
cluster, once under ``SchedulingPolicy()`` semantics (priority, fair share,
reservations, preemption) and once under ``SchedulingPolicy(fcfs=True)``, today's
single first-come-first-served queue with head-of-line blocking. Both runs call the
module's public functions (``next_job``, ``next_preemption``) exactly as a worker's
claim would; the simulation only moves time, starts what the policy returns and ends
jobs.

    .venv/bin/python benchmarks/sim_scheduler.py                  # the day below (~5 s)
    .venv/bin/python benchmarks/sim_scheduler.py --seeds 1 2 3 4 5  # and one line per seed
    .venv/bin/python benchmarks/sim_scheduler.py --json out.json  # also the numbers as JSON
    .venv/bin/python benchmarks/sim_scheduler.py --json -         # JSON on stdout only

The policy under test is ``FAIR`` below: the module's defaults but a 2-hour usage
half-life (the production default, 7 days, is meant for weeks; see
``SchedulingPolicy``). Not part of the test run; ``tests/test_scheduling.py`` runs a
small version (3 teams, 4 workers, 6 hours).

What is simulated
-----------------
- **Cluster**: 16 workers × 8 GPUs (128). A job runs on one worker.
- **Teams** (``TEAMS``): six, weights 1, 1, 2, 2, 3, 1, with different demand: a
  sweep of 360 one-GPU jobs submitted at once at 09:00 (preemptible); steady Poisson
  streams of mixed 1–4 GPU jobs; a daytime stream; a team of 2–8 GPU jobs; a team of
  8-GPU jobs only; a stream of short evaluation jobs, some urgent (priority 10).
  Run times are lognormal (minutes to hours, clipped to 5 min – 10 h). Submissions
  span 24 h; the simulation runs until every job has finished.
- **Progress ETAs**: a running job's expected remaining time (which the service
  measures from progress) is its true remaining time times a per-run lognormal error
  (σ = 0.25); the reservation rule uses it to choose which worker drains.
- **Preemption** (fair-share run only): a preempted job loses the work since its last
  checkpoint (every 15 min) plus 2 min of restart, and is queued again with its
  original submission time.
- **Dispatch**: after every event, workers with free GPUs ask for jobs, the fullest
  first (best fit), until the policy returns nothing for any of them.

What is measured
----------------
- **Utilisation**: busy GPU-seconds over 128 × the busy period (first submission to
  last completion), and over the time some job was waiting.
- **Shares**: each team's share of the GPU-hours used during the submission day
  against its *entitled* share. The entitlement is weighted max-min fairness applied
  at every instant: between two events each team's demand is the GPUs of its running
  and queued jobs, and the 128 GPUs are water-filled (``fair_allocation``: a team
  asking less than ``weight × level`` gets all it asks, the rest share by weight); a
  team's entitled GPU-seconds are the integral of its allocation over the day, and its
  entitled share its fraction of all entitled GPU-seconds. So a team alone on an
  idle cluster is entitled to all of it, and a team that stops submitting is entitled
  to nothing more. The deviation is ``|share − entitled share|`` in percentage points,
  and the headline is its maximum over teams. Each run is judged against the demand
  it faced (its own queue), the usual definition of an instantaneous fair share.
  Shares are measured over the submission day only: over the whole busy period every
  job eventually runs, so each team's GPU-hours would equal its demand whatever the
  scheduler; while the day is contended, the scheduler decides who gets the GPUs.
- **Waits**: submission to first start, p50 / p95 per job size and per team; the
  longest wait of an 8-GPU job, and per team the 8-GPU jobs' waits next to the team's
  smaller jobs' (a big job starved by backfill would wait far longer than its team's
  small ones); preemptions and the GPU-hours they lost.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.scheduling import (
    JobRequest,
    RunningJob,
    SchedulingPolicy,
    WorkerCapacity,
    fair_allocation,
    next_job,
    next_preemption,
)

HOUR = 3600.0
CHECKPOINT_SECONDS = 15 * 60.0
RESTART_SECONDS = 120.0
ETA_ERROR_SIGMA = 0.25

# The policy under test. The production default half-life is Slurm's 7 days; over a
# simulated day that would make fair share "who used least since midnight". A day-scale
# run needs a day to hold several half-lives, hence 2 hours here (the in-progress
# charge follows it: half_life / ln 2 per GPU held).
FAIR = SchedulingPolicy(half_life_seconds=2 * HOUR, reserve_after_seconds=1800.0)
FCFS = SchedulingPolicy(half_life_seconds=2 * HOUR, fcfs=True)


@dataclass(frozen=True)
class TeamSpec:
    """How one team submits. ``burst``: that many jobs at ``burst_at_h``; ``rate``:
    Poisson arrivals per hour between ``start_h`` and ``end_h``."""

    name: str
    weight: float
    gpus: tuple[int, ...]
    median_minutes: float
    sigma: float
    rate: float = 0.0
    start_h: float = 0.0
    end_h: float = 24.0
    burst: int = 0
    burst_at_h: float = 0.0
    p_priority: float = 0.0
    priority: int = 0
    p_preemptible: float = 0.0


TEAMS: tuple[TeamSpec, ...] = (
    # One hyper-parameter sweep: 360 one-GPU jobs at 09:00, preemptible (spot-like).
    TeamSpec("sweep", 1, (1,), 50, 0.5, burst=360, burst_at_h=9.0, p_preemptible=1.0),
    # Steady small jobs all day, some preemptible.
    TeamSpec("vision", 1, (1, 2, 2, 4), 90, 0.8, rate=4.0, p_preemptible=0.3),
    # A daytime stream (08:00–20:00).
    TeamSpec("speech", 2, (1, 1, 2, 4), 60, 0.9, rate=9.0, start_h=8, end_h=20),
    # Bigger jobs all day, a few with a deadline.
    TeamSpec("nlp", 2, (2, 4, 4, 8), 120, 0.7, rate=5.0, p_priority=0.05, priority=5),
    # 8-GPU jobs only.
    TeamSpec("foundation", 3, (8,), 150, 0.5, rate=1.5),
    # Short evaluation jobs, 15 % urgent.
    TeamSpec("eval", 1, (1, 1, 2), 15, 0.7, rate=12.0, p_priority=0.15, priority=10),
)


@dataclass
class SimJob:
    request: JobRequest
    work: float  # seconds of compute it needs
    remaining: float = 0.0
    first_start: float | None = None
    end: float | None = None
    preemptions: int = 0


@dataclass
class Run:
    job: SimJob
    worker: str
    started: float
    end: float
    eta_factor: float
    token: int


def _duration(rng: random.Random, spec: TeamSpec) -> float:
    seconds = spec.median_minutes * 60.0 * math.exp(spec.sigma * rng.gauss(0.0, 1.0))
    return min(max(seconds, 300.0), 10 * HOUR)


def generate(
    seed: int, teams: Sequence[TeamSpec] = TEAMS, hours: float = 24.0, scale: float = 1.0
) -> list[SimJob]:
    """The submissions: deterministic for a seed. ``scale`` multiplies rates and bursts."""
    jobs: list[SimJob] = []
    for index, spec in enumerate(teams):
        rng = random.Random(seed * 1000 + index)
        times: list[float] = []
        if spec.burst:
            times += [spec.burst_at_h * HOUR] * round(spec.burst * scale)
        if spec.rate > 0:
            t = spec.start_h * HOUR
            end = min(spec.end_h, hours) * HOUR
            while True:
                t += rng.expovariate(spec.rate * scale / HOUR)
                if t >= end:
                    break
                times.append(t)
        for n, submitted in enumerate(times):
            if submitted >= hours * HOUR:
                continue
            work = _duration(rng, spec)
            priority = spec.priority if rng.random() < spec.p_priority else 0
            request = JobRequest(
                id=f"{spec.name}-{n:04d}",
                team=spec.name,
                gpus=rng.choice(spec.gpus),
                priority=priority,
                preemptible=rng.random() < spec.p_preemptible and priority == 0,
                submitted_at=submitted,
            )
            jobs.append(SimJob(request, work, remaining=work))
    jobs.sort(key=lambda j: (j.request.submitted_at, j.request.id))
    return jobs


@dataclass
class Result:
    policy: str
    utilisation: float
    utilisation_while_waiting: float
    makespan_hours: float
    used_gpu_hours: dict[str, float]
    entitled_gpu_hours: dict[str, float]
    share: dict[str, float]
    entitled_share: dict[str, float]
    max_deviation_pp: float
    waits: dict[str, list[float]] = field(repr=False, default_factory=dict)
    preemptions: int = 0
    lost_gpu_hours: float = 0.0
    longest_8gpu_wait_hours: float = 0.0
    runtime_seconds: float = 0.0


def simulate(
    jobs: Sequence[SimJob],
    policy: SchedulingPolicy,
    weights: dict[str, float],
    *,
    workers: int = 16,
    gpus_per_worker: int = 8,
    window_hours: float = 24.0,
    seed: int = 0,
    trace: dict[str, dict[int, list[float]]] | None = None,
) -> Result:
    """Run ``jobs`` (copied) under ``policy``; shares are measured over the window."""
    began = time.perf_counter()
    rng = random.Random(seed + 7)
    fleet = [WorkerCapacity(f"w{i:02d}", gpus_per_worker) for i in range(workers)]
    capacity = workers * gpus_per_worker
    free = {w.id: w.gpus for w in fleet}
    by_id = {w.id: w for w in fleet}
    todo = [SimJob(j.request, j.work, remaining=j.work) for j in jobs]
    arrivals = sorted(todo, key=lambda j: (j.request.submitted_at, j.request.id))
    arrival_i = 0
    queued: dict[str, SimJob] = {}
    running: dict[str, Run] = {}
    ends: list[tuple[float, int, str]] = []
    usage = policy.new_usage()
    tokens = 0
    window = window_hours * HOUR
    teams = sorted({j.request.team for j in todo})
    used = dict.fromkeys(teams, 0.0)
    entitled = dict.fromkeys(teams, 0.0)
    busy = waiting_busy = waiting_time = 0.0
    preemptions = 0
    lost = 0.0
    first = arrivals[0].request.submitted_at if arrivals else 0.0
    t = first

    def account(t0: float, t1: float) -> None:
        nonlocal busy, waiting_busy, waiting_time
        dt = t1 - t0
        if dt <= 0:
            return
        held: dict[str, float] = defaultdict(float)
        for run in running.values():
            held[run.job.request.team] += run.job.request.gpus
        total = sum(held.values())
        busy += total * dt
        if queued:
            waiting_busy += total * dt
            waiting_time += dt
        inside = max(0.0, min(t1, window) - max(t0, 0.0))
        if inside <= 0:
            return
        demand = dict(held)
        for job in queued.values():
            demand[job.request.team] = demand.get(job.request.team, 0.0) + job.request.gpus
        share = fair_allocation(capacity, demand, weights)
        for team in teams:
            used[team] += held.get(team, 0.0) * inside
            entitled[team] += share.get(team, 0.0) * inside
        if trace is not None:  # GPU-seconds per team and hour: [used, entitled]
            a = max(t0, 0.0)
            while a < min(t1, window):
                hour = int(a // HOUR)
                b = min(t1, window, (hour + 1) * HOUR)
                for team in teams:
                    cell = trace.setdefault(team, {}).setdefault(hour, [0.0, 0.0])
                    cell[0] += held.get(team, 0.0) * (b - a)
                    cell[1] += share.get(team, 0.0) * (b - a)
                a = b

    def running_view(now: float) -> list[RunningJob]:
        return [
            RunningJob(
                r.job.request.id,
                r.job.request.team,
                r.job.request.gpus,
                r.job.request.priority,
                r.job.request.preemptible,
                r.started,
                r.worker,
                expected_remaining_seconds=max(r.end - now, 0.0) * r.eta_factor,
            )
            for r in running.values()
        ]

    def start(job: SimJob, wid: str, now: float) -> RunningJob:
        nonlocal tokens
        tokens += 1
        del queued[job.request.id]
        free[wid] -= job.request.gpus
        if job.first_start is None:
            job.first_start = now
        run = Run(
            job, wid, now, now + job.remaining, math.exp(rng.gauss(0, ETA_ERROR_SIGMA)), tokens
        )
        running[job.request.id] = run
        heapq.heappush(ends, (run.end, tokens, job.request.id))
        return RunningJob(
            job.request.id,
            job.request.team,
            job.request.gpus,
            job.request.priority,
            job.request.preemptible,
            now,
            wid,
            expected_remaining_seconds=job.remaining * run.eta_factor,
        )

    def stop(run: Run, now: float) -> None:
        del running[run.job.request.id]
        free[run.worker] += run.job.request.gpus
        usage.add_interval(run.job.request.team, run.job.request.gpus, run.started, now)

    def dispatch(now: float, first_worker: str | None = None) -> None:
        view = running_view(now)
        queue = [j.request for j in queued.values()]
        changed = True
        while changed and queue:
            changed = False
            order = sorted((w for w in free if free[w] > 0), key=lambda w: (free[w], w))
            if first_worker in order:
                order.remove(first_worker)
                order.insert(0, first_worker)
            for wid in order:
                while free[wid] > 0 and queue:
                    pick = next_job(
                        by_id[wid], queue, view, usage, weights, now, policy, workers=fleet
                    )
                    if pick is None:
                        break
                    view.append(start(queued[pick.id], wid, now))
                    queue.remove(pick)
                    changed = True

    while arrival_i < len(arrivals) or ends or queued:
        next_arrival = (
            arrivals[arrival_i].request.submitted_at if arrival_i < len(arrivals) else math.inf
        )
        next_end = ends[0][0] if ends else math.inf
        t_next = min(next_arrival, next_end)
        if math.isinf(t_next):
            break  # queued jobs that can never run (none in this workload)
        account(t, t_next)
        t = t_next
        while ends and ends[0][0] <= t:
            _, token, job_id = heapq.heappop(ends)
            run = running.get(job_id)
            if run is None or run.token != token:
                continue  # preempted meanwhile
            stop(run, t)
            run.job.remaining = 0.0
            run.job.end = t
        while arrival_i < len(arrivals) and arrivals[arrival_i].request.submitted_at <= t:
            job = arrivals[arrival_i]
            queued[job.request.id] = job
            arrival_i += 1
        target = None
        # Each plan stops at least one running job: at most that many rounds.
        for _ in range(len(running) if not policy.fcfs else 0):
            if not queued:
                break
            plan = next_preemption(
                [j.request for j in queued.values()],
                running_view(t),
                fleet,
                usage,
                weights,
                t,
                policy,
            )
            if plan is None:
                break
            for victim_id in plan.preempt:
                run = running[victim_id]
                stop(run, t)
                done = t - run.started
                lost_work = done % CHECKPOINT_SECONDS + RESTART_SECONDS
                lost += lost_work * run.job.request.gpus
                run.job.remaining = run.job.remaining - done + lost_work
                run.job.preemptions += 1
                queued[victim_id] = run.job
                preemptions += 1
            target = plan.worker
            dispatch(t, target)
        dispatch(t, target)

    makespan = t - first
    total_used = sum(used.values()) or 1.0
    total_entitled = sum(entitled.values()) or 1.0
    share = {team: used[team] / total_used for team in teams}
    entitled_share = {team: entitled[team] / total_entitled for team in teams}
    waits: dict[str, list[float]] = defaultdict(list)
    for job in todo:
        wait = (job.first_start or t) - job.request.submitted_at
        waits[f"size:{job.request.gpus}"].append(wait)
        waits[f"team:{job.request.team}"].append(wait)
        waits[f"team:{job.request.team}:size:{job.request.gpus}"].append(wait)
        waits["all"].append(wait)
    return Result(
        policy="fcfs" if policy.fcfs else "fair share",
        utilisation=busy / (capacity * makespan) if makespan else 0.0,
        utilisation_while_waiting=waiting_busy / (capacity * waiting_time) if waiting_time else 1.0,
        makespan_hours=makespan / HOUR,
        used_gpu_hours={k: v / HOUR for k, v in used.items()},
        entitled_gpu_hours={k: v / HOUR for k, v in entitled.items()},
        share=share,
        entitled_share=entitled_share,
        max_deviation_pp=100 * max(abs(share[k] - entitled_share[k]) for k in teams),
        waits=dict(waits),
        preemptions=preemptions,
        lost_gpu_hours=lost / HOUR,
        longest_8gpu_wait_hours=max(waits.get("size:8", [0.0])) / HOUR,
        runtime_seconds=time.perf_counter() - began,
    )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def compare(
    seed: int = 0,
    teams: Sequence[TeamSpec] = TEAMS,
    *,
    hours: float = 24.0,
    workers: int = 16,
    gpus_per_worker: int = 8,
    scale: float = 1.0,
    fair: SchedulingPolicy = FAIR,
    fcfs: SchedulingPolicy = FCFS,
) -> dict:
    """Both policies on the same submissions; a JSON-able summary."""
    jobs = generate(seed, teams, hours, scale)
    weights = {spec.name: float(spec.weight) for spec in teams}
    offered = sum(j.work * j.request.gpus for j in jobs) / HOUR
    results = [
        simulate(
            jobs,
            policy,
            weights,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            window_hours=hours,
            seed=seed,
        )
        for policy in (fair, fcfs)
    ]
    out: dict = {
        "seed": seed,
        "jobs": len(jobs),
        "gpus": workers * gpus_per_worker,
        "hours": hours,
        "offered_gpu_hours": offered,
        "capacity_gpu_hours": workers * gpus_per_worker * hours,
        "weights": weights,
        "policy": {
            "half_life_seconds": fair.half_life_seconds,
            "in_progress_seconds": fair.in_progress,
            "reserve_after_seconds": fair.reserve_after_seconds,
            "reserved_fraction": fair.reserved_fraction,
            "fair_share_reservations": fair.fair_share_reservations,
        },
        "runs": {},
    }
    for result in results:
        waits = {
            key: {
                "n": len(values),
                "p50_min": percentile(values, 50) / 60,
                "p95_min": percentile(values, 95) / 60,
                "max_min": max(values) / 60,
            }
            for key, values in sorted(result.waits.items())
        }
        out["runs"][result.policy] = {
            "utilisation": result.utilisation,
            "utilisation_while_waiting": result.utilisation_while_waiting,
            "makespan_hours": result.makespan_hours,
            "max_deviation_pp": result.max_deviation_pp,
            "share": result.share,
            "entitled_share": result.entitled_share,
            "used_gpu_hours": result.used_gpu_hours,
            "entitled_gpu_hours": result.entitled_gpu_hours,
            "waits": waits,
            "preemptions": result.preemptions,
            "lost_gpu_hours": result.lost_gpu_hours,
            "longest_8gpu_wait_hours": result.longest_8gpu_wait_hours,
            "runtime_seconds": result.runtime_seconds,
        }
    return out


def markdown(summary: dict) -> str:
    fair, fcfs = summary["runs"]["fair share"], summary["runs"]["fcfs"]
    lines = [
        f"{summary['jobs']} jobs, {summary['offered_gpu_hours']:.0f} GPU-hours offered in"
        f" {summary['hours']:g} h on {summary['gpus']} GPUs"
        f" ({summary['capacity_gpu_hours']:.0f} GPU-hours); seed {summary['seed']}",
        "",
        "| | fair share | FCFS |",
        "|---|---|---|",
        f"| utilisation, busy period | {fair['utilisation']:.1%} | {fcfs['utilisation']:.1%} |",
        f"| utilisation while jobs waited | {fair['utilisation_while_waiting']:.1%}"
        f" | {fcfs['utilisation_while_waiting']:.1%} |",
        f"| busy period (h) | {fair['makespan_hours']:.1f} | {fcfs['makespan_hours']:.1f} |",
        f"| max abs deviation from entitled share (pp) | {fair['max_deviation_pp']:.1f}"
        f" | {fcfs['max_deviation_pp']:.1f} |",
        f"| wait p50 / p95, all jobs (min) | {_wait(fair, 'all')} | {_wait(fcfs, 'all')} |",
        f"| longest wait of an 8-GPU job (h) | {fair['longest_8gpu_wait_hours']:.1f}"
        f" | {fcfs['longest_8gpu_wait_hours']:.1f} |",
        f"| longest wait of any job (h) | {fair['waits']['all']['max_min'] / 60:.1f}"
        f" | {fcfs['waits']['all']['max_min'] / 60:.1f} |",
        f"| preemptions (GPU-h lost) | {fair['preemptions']} ({fair['lost_gpu_hours']:.1f})"
        f" | {fcfs['preemptions']} |",
        "",
        "| team | weight | entitled | fair share | dev (pp) | FCFS | dev (pp)"
        " | wait p50 / p95 fair (min) | FCFS (min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for team, weight in summary["weights"].items():
        lines.append(
            f"| {team} | {weight:g} | {fair['entitled_share'][team]:.1%}"
            f" | {fair['share'][team]:.1%}"
            f" | {100 * (fair['share'][team] - fair['entitled_share'][team]):+.1f}"
            f" | {fcfs['share'][team]:.1%} (of {fcfs['entitled_share'][team]:.1%})"
            f" | {100 * (fcfs['share'][team] - fcfs['entitled_share'][team]):+.1f}"
            f" | {_wait(fair, 'team:' + team)} | {_wait(fcfs, 'team:' + team)} |"
        )
    lines += [
        "",
        "| job size | jobs | wait p50 / p95 fair (min) | FCFS (min) |",
        "|---|---|---|---|",
    ]
    sizes = sorted((k for k in fair["waits"] if k.startswith("size:")), key=lambda k: int(k[5:]))
    for key in sizes:
        lines.append(
            f"| {key[5:]} GPU | {fair['waits'][key]['n']} | {_wait(fair, key)}"
            f" | {_wait(fcfs, key)} |"
        )
    lines += [
        "",
        "| 8-GPU jobs of team | jobs | wait p50 / max fair (min) | FCFS (min)"
        " | team's smaller jobs p50 / max fair (min) |",
        "|---|---|---|---|---|",
    ]
    for team in summary["weights"]:
        key = f"team:{team}:size:8"
        if key not in fair["waits"]:
            continue
        small = [
            w for k, w in fair["waits"].items() if k.startswith(f"team:{team}:size:") and k != key
        ]
        smaller = (
            f"{max(w['p50_min'] for w in small):.0f} / {max(w['max_min'] for w in small):.0f}"
            if small
            else "none"
        )
        lines.append(
            f"| {team} | {fair['waits'][key]['n']} | {_wait(fair, key, 'max_min')}"
            f" | {_wait(fcfs, key, 'max_min')} | {smaller} |"
        )
    return "\n".join(lines)


def _wait(run: dict, key: str, high: str = "p95_min") -> str:
    w = run["waits"][key]
    return f"{w['p50_min']:.0f} / {w[high]:.0f}"


def _headline(summary: dict) -> dict:
    fair, fcfs = summary["runs"]["fair share"], summary["runs"]["fcfs"]
    return {
        "seed": summary["seed"],
        "fair_dev": fair["max_deviation_pp"],
        "fcfs_dev": fcfs["max_deviation_pp"],
        "fair_util": fair["utilisation"],
        "fcfs_util": fcfs["utilisation"],
        "fair_8gpu_h": fair["longest_8gpu_wait_hours"],
        "fcfs_8gpu_h": fcfs["longest_8gpu_wait_hours"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every team's demand")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--json", metavar="PATH", help="write the summary as JSON ('-': stdout)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", metavar="SEED", help="also run these seeds: one line each"
    )
    args = parser.parse_args(argv)
    summary = compare(args.seed, hours=args.hours, workers=args.workers, scale=args.scale)
    if args.seeds:
        summary["seeds"] = [
            _headline(compare(seed, hours=args.hours, workers=args.workers, scale=args.scale))
            for seed in args.seeds
        ]
    if args.json == "-":
        json.dump(summary, sys.stdout, indent=2)
        print()
        return 0
    print(markdown(summary))
    if args.seeds:
        print(
            "\n| seed | max dev fair (pp) | FCFS (pp) | utilisation fair | FCFS"
            " | longest 8-GPU wait fair (h) | FCFS (h) |\n|---|---|---|---|---|---|---|"
        )
        for row in summary["seeds"]:
            print(
                f"| {row['seed']} | {row['fair_dev']:.1f} | {row['fcfs_dev']:.1f}"
                f" | {row['fair_util']:.1%} | {row['fcfs_util']:.1%}"
                f" | {row['fair_8gpu_h']:.1f} | {row['fcfs_8gpu_h']:.1f} |"
            )
    runtime = sum(r["runtime_seconds"] for r in summary["runs"].values())
    print(f"\n(seed {args.seed}: both runs simulated in {runtime:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
