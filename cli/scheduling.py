"""``ldreg workers`` and ``ldreg queue``: the fleet and the queue as the scheduler sees
them (GET /v1/workers, GET /v1/queue)."""

from __future__ import annotations

from cli.remote import DEFAULT_URL, ApiKey, Url, _api, _fmt_duration


def workers(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Live workers: GPUs, queues, busy or idle, and which of your jobs runs where."""
    with _api(url, api_key) as api:
        rows = api.workers()
    if not rows:
        print("no live worker is registered")
        return
    print(f"{'WORKER':40} {'QUEUES':9} {'GPUS':>4} {'FREE':>4} {'STATE':5}  YOUR JOBS")
    for w in rows:
        mine = ", ".join(f"{j['id'][:8]} ({j['gpus']} on {j['devices']})" for j in w["jobs"])
        others = f"{w['other_jobs']} of other teams" if w["other_jobs"] else ""
        running = "; ".join(x for x in (mine, others) if x) or "-"
        print(
            f"{w['id'][:40]:40} {','.join(w['queues']):9} {w['gpus']:>4} {w['free_gpus']:>4}"
            f" {w['state']:5}  {running}"
        )


def queue(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Your queued jobs: position in the whole queue, why each waits, estimated start."""
    with _api(url, api_key) as api:
        view = api.queue()
    print(
        f"{view['queued_total']} queued ({view['queued_other_teams']} of other teams),"
        f" {view['running_total']} running, {view['live_workers']} live workers"
    )
    if not view["jobs"]:
        print("none of your jobs is queued")
        return
    print(f"{'POS':>4} {'JOB':12} {'GPUS':>4} {'PRIO':>4} {'START IN':>9}  REASON")
    for j in view["jobs"]:
        pos = "-" if j["position"] is None else str(j["position"])
        eta = j["estimated_start_seconds"]
        start = "?" if eta is None else _fmt_duration(eta)
        head = f"{pos:>4} {j['id'][:12]:12} {j['gpus']:>4} {j['priority']:>4} {start:>9}"
        print(f"{head}  {j['reason']}")
