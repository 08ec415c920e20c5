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
    more);

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
        const values = [job.kind, methodOf(job), ldregOf(job), stateBadge(job.state),
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
  }
  every(POLL_MS, refresh);
}

// Job page ------------------------------------------------------------------------------
