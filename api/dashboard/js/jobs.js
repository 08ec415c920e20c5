// The job list.
import { KINDS, POLL_MS, STATES, api, every, fmtTime, h, jobTitle, ldregOf, methodOf, notify, placeChildren, progressCell, replaceIfChanged, session, stale, stateBadge } from "./core.js";

export function renderJobs(view, params) {
  document.title = "Jobs · LDReg";
  const generation = session.generation;
  const filters = { state: params.get("state") || "", kind: params.get("kind") || "" };
  let limit = 50;
  const selected = new Set();

  const stateSelect = h("select", { id: "filter-state" },
    h("option", { value: "" }, "all states"), STATES.map((s) => h("option", { value: s, selected: s === filters.state }, s)));
  const kindSelect = h("select", { id: "filter-kind" },
    h("option", { value: "" }, "all kinds"), KINDS.map((k) => h("option", { value: k, selected: k === filters.kind }, k)));
  const onFilter = () => {
    const q = new URLSearchParams();
    if (stateSelect.value) q.set("state", stateSelect.value);
    if (kindSelect.value) q.set("kind", kindSelect.value);
    location.hash = `#/jobs${q.toString() ? "?" + q : ""}`;
  };
  stateSelect.addEventListener("change", onFilter);
  kindSelect.addEventListener("change", onFilter);

  const compareButton = h("button", { type: "button", id: "compare-selected", class: "secondary", disabled: true },
    "Compare selected");
  compareButton.addEventListener("click", () => {
    location.hash = `#/compare?jobs=${[...selected].join(",")}`;
  });
  const tbody = h("tbody", { id: "job-rows" });
  const more = h("button", { type: "button", class: "secondary", id: "more-jobs", hidden: true }, "Show more");
  more.addEventListener("click", () => { limit = Math.min(limit + 50, 200); refresh(); });
  // Workers and the queue (GET /v1/workers, /v1/queue): capacity, busy or idle, and
  // where your queued jobs stand; other teams' jobs only as counts.
  const fleet = h("section", { id: "fleet", class: "hint", "aria-label": "Workers and queue" });

  view.append(
    h("h1", {}, "Jobs"),
    h("div", { class: "row", role: "search", "aria-label": "Filter jobs" },
      h("label", { for: "filter-state" }, "State", stateSelect),
      h("label", { for: "filter-kind" }, "Kind", kindSelect),
      h("span", { style: "flex:1" }),
      compareButton,
      h("a", { class: "button", href: "#/submit" }, "New pretrain job")),
    h("table", { id: "jobs-table", "aria-describedby": "jobs-caption" },
      h("caption", { id: "jobs-caption" }, "Your team's jobs, newest first. Updates every 2 seconds."),
      h("thead", {}, h("tr", {},
        h("th", { scope: "col" }, h("span", { class: "sr-only" }, "Select for comparison")),
        ["Name", "Kind", "Method", "LDReg", "State", "Progress", "Created"].map((c) => h("th", { scope: "col" }, c)))),
      tbody),
    more,
    fleet);

  // One row per job, kept across polls: the checkbox and the link are the same elements
  // from one refresh to the next, so a click that lands while a poll updates the list
  // is not lost on an element that was just replaced.
  const rowsById = new Map();
  function jobRow(job) {
    const box = h("input", { type: "checkbox", "aria-label": `Select ${jobTitle(job)} for comparison` });
    box.checked = selected.has(job.id);
    box.addEventListener("change", () => {
      if (box.checked) selected.add(job.id); else selected.delete(job.id);
      compareButton.disabled = selected.size < 2;
    });
    const link = h("a", { href: `#/jobs/${job.id}` });
    const cells = Array.from({ length: 6 }, () => h("td"));
    const tr = h("tr", { "data-job-id": job.id },
      h("td", {}, box), h("td", {}, link, h("div", { class: "mono hint" }, job.id.slice(0, 12))), cells);
    return {
      tr,
      update(job, durations) {
        tr.dataset.state = job.state;
        link.textContent = jobTitle(job);
        // A sweep: how many children it runs (they are listed too, each a job).
        const kind = job.kind === "sweep" ? `sweep · ${job.children} children` : job.kind;
        const state = job.queue_reason
          ? h("span", {}, stateBadge(job.state), h("div", { class: "hint" }, job.queue_reason))
          : stateBadge(job.state);
        const values = [kind, methodOf(job), ldregOf(job), state,
          progressCell(job, durations), fmtTime(job.created_at)];
        values.forEach((v, i) => replaceIfChanged(cells[i], v));
      },
    };
  }

  async function refresh() {
    const q = new URLSearchParams({ limit: String(limit) });
    if (filters.state) q.set("state", filters.state);
    if (filters.kind) q.set("kind", filters.kind);
    let page;
    try {
      page = await api(`/v1/jobs?${q}`);
    } catch (err) {
      if (!stale(generation)) notify(err.message, true);
      return;
    }
    if (stale(generation)) return;
    // Past epoch durations of running jobs, for their ETA.
    const durations = {};
    await Promise.all(page.jobs.filter((j) => j.state === "running" && j.kind === "pretrain").map(async (j) => {
      try {
        durations[j.id] = (await api(`/v1/jobs/${j.id}/metrics?name=epoch_seconds`)).series.epoch_seconds;
      } catch (_) { /* ETA falls back to started_at */ }
    }));
    if (stale(generation)) return;
    notify("");
    const rows = page.jobs.map((job) => {
      let row = rowsById.get(job.id);
      if (!row) {
        row = jobRow(job);
        rowsById.set(job.id, row);
      }
      row.update(job, durations[job.id]);
      return row.tr;
    });
    const keep = new Set(page.jobs.map((j) => j.id));
    for (const id of [...rowsById.keys()]) if (!keep.has(id)) rowsById.delete(id);
    // How many polls have updated the list (the browser test waits on it).
    tbody.dataset.refreshes = String(Number(tbody.dataset.refreshes || 0) + 1);
    placeChildren(tbody, page.jobs.length ? rows : [h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No jobs match."))]);
    more.hidden = !page.next_cursor || limit >= 200;
    refreshFleet();
  }

  async function refreshFleet() {
    let workers, queue;
    try {
      [workers, queue] = await Promise.all([api("/v1/workers"), api("/v1/queue")]);
    } catch (_) { return; /* the job list's own errors are reported above */ }
    if (stale(generation)) return;
    const ws = workers.workers;
    const gpus = ws.reduce((n, w) => n + w.gpus, 0);
    const free = ws.reduce((n, w) => n + w.free_gpus, 0);
    const lines = [
      h("div", { id: "fleet-workers" }, ws.length
        ? `Workers: ${ws.length} live, ${gpus} GPUs, ${free} free (` +
          ws.map((w) => `${w.id}: ${w.state}, ${w.free_gpus}/${w.gpus} free`).join("; ") + ")"
        : "Workers: none live; queued jobs start when one registers"),
      h("div", { id: "fleet-queue" }, `Queue: ${queue.queued_total} queued` +
        ` (${queue.queued_total - queue.queued_other_teams} yours), ${queue.running_total} running` +
        (queue.jobs.length ? "; next of yours: #" + (queue.jobs[0].position ?? "-") +
          ` ${queue.jobs[0].id.slice(0, 12)}, ${queue.jobs[0].reason}` : "")),
    ];
    placeChildren(fleet, lines);
  }
  every(POLL_MS, refresh);
}

// Job page ------------------------------------------------------------------------------
