/* LDReg dashboard: a single page over HTTP API v1 (no build step, no framework).
 *
 * Views (hash routes): #/jobs, #/jobs/<id>, #/compare?jobs=a,b, #/submit; the sign-in
 * form whenever no key is held. The team API key lives in sessionStorage only: it is
 * gone when the tab closes and never written to disk by us or sent anywhere but this
 * origin's API. Every piece of server data reaches the page through textContent (the
 * `h` helper), never innerHTML.
 */
"use strict";

const KEY_STORAGE = "ldreg.apiKey";
const POLL_MS = 2000;
const STATES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"];
const ACTIVE = new Set(["queued", "running", "cancelling"]);
const KINDS = ["pretrain", "diagnose"];
// Metric names of docs/science.md; each group is one plot.
const PLOTS = [
  { id: "loss", title: "Loss terms (ldreg_loss on the right axis)", series: ["loss", "ssl_loss", "ldreg_loss"], rightAxis: ["ldreg_loss"] },
  { id: "lid", title: "Geometric-mean LID: held-out MLE (k32, k512) and the LDReg term's own estimate on training batches (ldreg_lid_gmean)", series: ["lid_gmean_k32", "lid_gmean_k512", "ldreg_lid_gmean"] },
  { id: "rank", title: "Effective rank", series: ["effective_rank"] },
  { id: "acc", title: "Held-out accuracy: kNN and online probe at every evaluation, offline linear probe (L2 chosen) at the end", series: ["knn_acc", "online_probe_acc", "linear_probe_acc"] },
];
const PLOTTED = new Set(PLOTS.flatMap((p) => p.series));
const HIDDEN_SERIES = new Set(["epoch_seconds"]);
// Okabe–Ito palette: distinguishable with colour-blindness, dark enough on white.
const COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#8C564B"];
const DASHES = [[], [6, 3], [2, 2], [8, 3, 2, 3]];

const session = { key: sessionStorage.getItem(KEY_STORAGE), timers: [], charts: [], generation: 0 };

// ---------------------------------------------------------------------------------------
// Helpers

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// Polling updates the page in place. Replacing an element the user is clicking loses
// the click (the press lands on the old element, the release on its replacement), so
// interactive elements are kept and only what changed is rewritten.
function replaceIfChanged(el, ...children) {
  const next = h("div", {}, ...children);
  if (next.innerHTML !== el.innerHTML) el.replaceChildren(...next.childNodes);
}

// Make `nodes` the children of `parent`, in order, moving only what has to move.
function placeChildren(parent, nodes) {
  const wanted = new Set(nodes);
  for (const child of [...parent.children]) if (!wanted.has(child)) child.remove();
  nodes.forEach((node, i) => {
    if (parent.children[i] !== node) parent.insertBefore(node, parent.children[i] || null);
  });
}

class ApiError extends Error {
  constructor(status, code, message, field, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field || null;
    this.details = details || [];
  }
}

async function api(path, { method = "GET", json, raw = false, signOutOn401 = true } = {}) {
  const headers = { Accept: "application/json" };
  if (session.key) headers.Authorization = `Bearer ${session.key}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body });
  } catch (err) {
    throw new ApiError(0, "unreachable", "The server did not answer; retrying.");
  }
  if (!response.ok) {
    let error = {};
    try {
      error = (await response.json()).error || {};
    } catch (_) { /* not JSON */ }
    const err = new ApiError(response.status, error.code || `http_${response.status}`,
      error.message || response.statusText, error.field, error.details);
    if (response.status === 401 && signOutOn401) signOut(`Signed out: ${err.message}`);
    throw err;
  }
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

function notify(message, isError = false) {
  const el = document.getElementById("notice");
  el.textContent = message || "";
  el.classList.toggle("error", Boolean(isError && message));
}

function fmtTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

function fmtNum(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  if (!Number.isFinite(v)) return String(v);
  if (Number.isInteger(v)) return String(v);
  return Math.abs(v) >= 1000 || Math.abs(v) < 0.001 ? v.toExponential(3) : v.toPrecision(4);
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "";
  seconds = Math.max(0, Math.round(seconds));
  const hh = Math.floor(seconds / 3600), mm = Math.floor((seconds % 3600) / 60), ss = seconds % 60;
  return hh ? `${hh}h ${String(mm).padStart(2, "0")}m` : `${mm}m ${String(ss).padStart(2, "0")}s`;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function jobTitle(job) {
  return job.name || job.id.slice(0, 12);
}

function methodOf(job) {
  return job.kind === "pretrain" ? job.spec.method || "–" : "–";
}

function ldregOf(job) {
  if (job.kind !== "pretrain") return "–";
  const ldreg = job.spec.ldreg;
  if (ldreg === null) return "off";
  return ldreg && ldreg.alpha !== undefined && ldreg.alpha !== null ? `on (α=${ldreg.alpha})` : "on";
}

function stateBadge(state) {
  return h("span", { class: `state state-${state}`, "data-state": state }, state);
}

/* ETA = remaining epochs × mean past epoch duration: the `epoch_seconds` series when the
 * worker reports it, else the time since the job started divided by finished epochs. */
function etaSeconds(job, epochSeconds) {
  const { epoch, epochs } = job.progress || {};
  if (job.state !== "running" || !epochs || !epoch || epoch >= epochs) return null;
  let perEpoch = null;
  if (epochSeconds && epochSeconds.length) {
    perEpoch = epochSeconds.reduce((a, p) => a + p.value, 0) / epochSeconds.length;
  } else if (job.started_at) {
    perEpoch = (Date.now() - new Date(job.started_at).getTime()) / 1000 / epoch;
  }
  return perEpoch === null ? null : perEpoch * (epochs - epoch);
}

function progressCell(job, epochSeconds) {
  const { epoch = 0, epochs = 0 } = job.progress || {};
  if (!epochs) return h("span", { class: "eta" }, job.state === "running" ? "running" : "–");
  const eta = etaSeconds(job, epochSeconds);
  return h("div", { class: "progress" },
    h("progress", { max: epochs, value: epoch, "aria-label": `epoch ${epoch} of ${epochs}` }),
    h("span", { class: "mono" }, `${epoch}/${epochs}`),
    eta !== null ? h("span", { class: "eta" }, `ETA ${fmtDuration(eta)}`) : null);
}

function every(ms, fn) {
  const generation = session.generation;
  let running = false;
  const tick = async () => {
    if (running || generation !== session.generation) return;
    running = true;
    try { await fn(); } finally { running = false; }
  };
  session.timers.push(setInterval(tick, ms));
  return tick();
}

function stale(generation) {
  return generation !== session.generation;
}

function parseHash() {
  const hash = location.hash.replace(/^#/, "") || "/jobs";
  const [path, query = ""] = hash.split("?");
  return { parts: path.split("/").filter(Boolean), params: new URLSearchParams(query) };
}

// ---------------------------------------------------------------------------------------
// Charts (Chart.js, vendored)

/* Points of one series as {x, y}: x is the epoch, with several points of one epoch
 * spread evenly inside it (a per-step series plots on the same axis as per-epoch ones). */
function toXY(points) {
  const byEpoch = new Map();
  for (const p of points) {
    if (!byEpoch.has(p.epoch)) byEpoch.set(p.epoch, []);
    byEpoch.get(p.epoch).push(p);
  }
  const out = [];
  for (const [epoch, pts] of [...byEpoch.entries()].sort((a, b) => a[0] - b[0])) {
    pts.sort((a, b) => a.step - b.step);
    pts.forEach((p, i) => out.push({ x: pts.length === 1 ? epoch : epoch - 1 + (i + 1) / pts.length, y: p.value }));
  }
  return out;
}

function makeLineChart(figure, datasets, { xTitle = "epoch", yTitle = "" } = {}) {
  const canvas = figure.querySelector("canvas");
  const chart = new Chart(canvas, {
    type: "line",
    data: { datasets },
    options: {
      animation: false,
      maintainAspectRatio: false,
      parsing: true,
      normalized: true,
      interaction: { mode: "nearest", intersect: false },
      scales: {
        x: { type: "linear", title: { display: true, text: xTitle }, ticks: { precision: 0 } },
        y: { title: { display: Boolean(yTitle), text: yTitle } },
        // A second axis for a term on another scale (the LDReg term next to the SSL loss).
        y2: { position: "right", display: "auto", grid: { drawOnChartArea: false } },
      },
      plugins: { legend: { position: "bottom", labels: { boxWidth: 18 } } },
      elements: { point: { radius: 2.5 }, line: { borderWidth: 2 } },
    },
  });
  session.charts.push(chart);
  return chart;
}

function chartFigure(id, title) {
  return h("figure", { class: "chart", id: `chart-${id}`, "data-points": "0" },
    h("figcaption", { id: `chart-${id}-title` }, title),
    h("div", { class: "chart-box" },
      h("canvas", { role: "img", "aria-labelledby": `chart-${id}-title`, "aria-describedby": `chart-${id}-desc` })),
    h("p", { class: "sr-only", id: `chart-${id}-desc`, "aria-live": "off" }, "no data yet"));
}

/* Replace a chart's datasets and publish its point count (data-points, read by the
 * browser test) and a text summary for screen readers. */
function setChartData(chart, figure, datasets) {
  chart.data.datasets = datasets;
  chart.update("none");
  const count = datasets.reduce((n, d) => n + d.data.length, 0);
  figure.dataset.points = String(count);
  const last = datasets.filter((d) => d.data.length)
    .map((d) => `${d.label}: ${fmtNum(d.data[d.data.length - 1].y)} at epoch ${fmtNum(d.data[d.data.length - 1].x)}`);
  figure.querySelector(".sr-only").textContent = last.length ? `Latest values. ${last.join("; ")}.` : "no data yet";
}

function dataset(label, data, index, dashIndex = 0) {
  const color = COLORS[index % COLORS.length];
  return { label, data, borderColor: color, backgroundColor: color, borderDash: DASHES[dashIndex % DASHES.length], pointRadius: data.length > 60 ? 0 : 2.5 };
}

// ---------------------------------------------------------------------------------------
// Views

function render() {
  session.generation += 1;
  session.timers.forEach(clearInterval);
  session.timers = [];
  session.charts.forEach((c) => c.destroy());
  session.charts = [];
  notify("");
  const view = document.getElementById("view");
  view.replaceChildren();
  const nav = document.getElementById("nav");
  nav.hidden = !session.key;
  if (!session.key) return renderSignIn(view);
  const { parts, params } = parseHash();
  for (const a of nav.querySelectorAll("a[data-nav]")) {
    if (a.dataset.nav === parts[0]) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (parts[0] === "jobs" && parts[1]) return renderJob(view, decodeURIComponent(parts[1]));
  if (parts[0] === "compare") return renderCompare(view, params);
  if (parts[0] === "submit") return renderSubmit(view);
  return renderJobs(view, params);
}

function signOut(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  session.key = null;
  render();
  if (message) notify(message, true);
}

function renderSignIn(view) {
  document.title = "Sign in · LDReg";
  const input = h("input", { id: "api-key", name: "api-key", type: "password", autocomplete: "off", required: true, spellcheck: "false", "aria-describedby": "api-key-hint" });
  const error = h("p", { class: "field-error", id: "signin-error", role: "alert" });
  const form = h("form", { class: "panel signin", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Sign in"),
    h("label", { for: "api-key" }, "Team API key", input),
    h("p", { class: "hint", id: "api-key-hint" },
      "Paste your team's key (ldreg admin create-team prints one). It is kept in this browser tab only and forgotten when you close it."),
    error,
    h("button", { type: "submit", id: "sign-in" }, "Sign in"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    session.key = key;
    try {
      await api("/v1/jobs?limit=1", { signOutOn401: false });
    } catch (err) {
      session.key = null;
      error.textContent = err.status === 401 ? "That key was not accepted." : err.message;
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    if (!location.hash || location.hash === "#/" ) location.hash = "#/jobs";
    render();
  });
  view.append(form);
  input.focus();
}

// Job list ------------------------------------------------------------------------------

function renderJobs(view, params) {
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

function renderJob(view, jobId) {
  const generation = session.generation;
  const head = h("section", { class: "job-head", "aria-label": "Job" });
  const errorBox = h("div", { id: "job-error" });
  const plotsSection = h("section", { "aria-labelledby": "plots-title" }, h("h2", { id: "plots-title" }, "Metrics"));
  const diagSection = h("section", { id: "diagnosis", hidden: true, "aria-labelledby": "diag-title" }, h("h2", { id: "diag-title" }, "Diagnosis"));
  const timeline = h("ol", { class: "timeline", id: "events" });
  const artifacts = h("div", { id: "artifacts" });
  const spec = h("pre", { class: "spec mono", id: "spec" });
  view.append(
    h("p", {}, h("a", { href: "#/jobs" }, "← All jobs")),
    head, errorBox, plotsSection, diagSection,
    h("section", { "aria-labelledby": "events-title" }, h("h2", { id: "events-title" }, "Events"), timeline),
    h("section", { "aria-labelledby": "artifacts-title" }, h("h2", { id: "artifacts-title" }, "Artifacts"), artifacts),
    h("section", { "aria-labelledby": "spec-title" }, h("h2", { id: "spec-title" }, "Spec"), spec));

  const series = {};
  let lastStep = null;
  let charts = null;
  let extraCharts = {};
  let chartGrid = null;
  let job = null;
  let artifactNames = "";

  function setupCharts() {
    chartGrid = h("div", { class: "charts", id: "charts" });
    plotsSection.append(chartGrid);
    charts = PLOTS.map((plot) => {
      const figure = chartFigure(plot.id, plot.title);
      chartGrid.append(figure);
      return { plot, figure, chart: makeLineChart(figure, []) };
    });
  }

  function updateCharts() {
    // A diagnosis has no training curves: its results are the Diagnosis section.
    plotsSection.hidden = job.kind !== "pretrain" && !Object.keys(series).length;
    if (plotsSection.hidden) return;
    if (!charts) setupCharts();
    for (const { plot, figure, chart } of charts) {
      const datasets = plot.series.filter((n) => series[n]).map((n, i) => ({
        ...dataset(n, toXY(series[n]), i),
        yAxisID: (plot.rightAxis || []).includes(n) ? "y2" : "y",
      }));
      setChartData(chart, figure, datasets);
    }
    const others = Object.keys(series).filter((n) => !PLOTTED.has(n) && !HIDDEN_SERIES.has(n)).sort();
    for (const name of others.slice(0, 12)) {
      if (!extraCharts[name]) {
        const figure = chartFigure(`extra-${name.replace(/[^a-z0-9_-]/gi, "_")}`, name);
        chartGrid.append(figure);
        extraCharts[name] = { figure, chart: makeLineChart(figure, []) };
      }
      const { figure, chart } = extraCharts[name];
      setChartData(chart, figure, [dataset(name, toXY(series[name]), 4)]);
    }
  }

  // The buttons are made once; each poll only sets whether they can be pressed.
  const headInfo = h("div", { class: "job-info" });
  const cancel = h("button", { type: "button", id: "cancel-job", class: "danger", disabled: true }, "Cancel");
  const retry = h("button", { type: "button", id: "retry-job", class: "secondary", disabled: true }, "Retry");
  cancel.addEventListener("click", () => act("cancel"));
  retry.addEventListener("click", () => act("retry"));
  head.append(headInfo, h("div", { class: "actions" }, cancel, retry));

  function renderHead() {
    document.title = `${jobTitle(job)} · LDReg`;
    cancel.disabled = !ACTIVE.has(job.state) || job.state === "cancelling";
    retry.disabled = !["failed", "cancelled"].includes(job.state);
    const rows = [
      ["State", stateBadge(job.state)],
      ["Kind", job.kind],
      job.kind === "pretrain" ? ["Method", `${methodOf(job)} · ${job.spec.backbone || ""}`] : null,
      job.kind === "pretrain" ? ["LDReg", ldregOf(job)] : null,
      ["Progress", progressCell(job, series.epoch_seconds)],
      ["Attempt", String(job.attempt)],
      ["Created", fmtTime(job.created_at)],
      ["Started", fmtTime(job.started_at)],
      ["Finished", fmtTime(job.finished_at)],
    ].filter(Boolean);
    replaceIfChanged(headInfo,
      h("h1", { id: "job-title" }, jobTitle(job), " ", h("span", { class: "mono hint" }, job.id)),
      h("dl", {}, rows.map(([k, v]) => [h("dt", {}, k), h("dd", { "data-field": k.toLowerCase() }, v)])));
    replaceIfChanged(errorBox, job.error && h("div", { class: "error-box", role: "alert" },
      h("strong", {}, `Failed: ${job.error.code}`), h("p", {}, job.error.message)));
    const specText = JSON.stringify(job.spec, null, 2);
    if (spec.textContent !== specText) spec.textContent = specText;
  }

  async function act(action) {
    try {
      job = await api(`/v1/jobs/${jobId}/${action}`, { method: "POST" });
      notify(action === "cancel" ? `Cancellation requested (${job.state}).` : `Job requeued (${job.state}).`);
      renderHead();
      if (action === "retry") every(POLL_MS, refresh);
    } catch (err) {
      notify(err.message, true);
    }
  }

  async function refreshEvents() {
    const { events } = await api(`/v1/jobs/${jobId}/events`);
    if (stale(generation)) return;
    replaceIfChanged(timeline, events.length ? events.map((e) => h("li", {},
      h("time", { datetime: e.at }, fmtTime(e.at)),
      h("strong", {}, `${e.from_state || "–"} → ${e.to_state}`),
      ` · attempt ${e.attempt}`,
      e.reason ? h("div", {}, e.reason) : null)) : h("li", { class: "empty" }, "No events yet."));
  }

  async function refreshArtifacts() {
    const list = (await api(`/v1/jobs/${jobId}/artifacts`)).artifacts;
    if (stale(generation)) return;
    const names = list.map((a) => a.name).join("|");
    if (names === artifactNames && artifacts.childElementCount) return;
    artifactNames = names;
    if (!list.length) {
      artifacts.replaceChildren(h("p", { class: "empty" }, "No artifacts yet."));
      return;
    }
    artifacts.replaceChildren(h("table", {},
      h("thead", {}, h("tr", {}, ["Name", "Size", "Created", ""].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, list.map((a) => {
        const button = h("button", { type: "button", class: "secondary", "aria-label": `Download ${a.name}` }, "Download");
        button.addEventListener("click", () => downloadArtifact(jobId, a.name));
        return h("tr", {}, h("td", { class: "mono" }, a.name), h("td", { class: "num" }, fmtBytes(a.size)),
          h("td", {}, fmtTime(a.created_at)), h("td", {}, button));
      }))));
    if (job && job.kind === "diagnose") renderDiagnosis(list);
  }

  async function renderDiagnosis(artifactList) {
    if (!job.summary) return;
    diagSection.hidden = false;
    diagSection.replaceChildren(h("h2", { id: "diag-title" }, "Diagnosis"));
    const s = job.summary;
    const lid = s.lid_gmean || {};
    const collapse = s.collapse_fraction || {};
    const estimators = Object.keys(lid);
    const ks = [...new Set(estimators.flatMap((e) => Object.keys(lid[e])))].sort((a, b) => a - b);
    diagSection.append(h("table", { id: "diagnosis-table" },
      h("caption", {}, "Geometric-mean LID and local-collapse fraction (share of points with LID below gmean / e)"),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "estimator"),
        ks.map((k) => [h("th", { scope: "col", class: "num" }, `LID k=${k}`), h("th", { scope: "col", class: "num" }, `collapsed k=${k}`)]))),
      h("tbody", {}, estimators.map((e) => h("tr", {}, h("th", { scope: "row" }, e),
        ks.map((k) => [h("td", { class: "num" }, fmtNum(lid[e][k])),
          h("td", { class: "num", "data-collapse": `${e}-${k}` }, collapse[e] && collapse[e][k] !== undefined ? `${(100 * collapse[e][k]).toFixed(2)} %` : "–")]))))));
    const globals = ["effective_rank", "alpha_req", "pca_dim_90", "pca_dim_99", "num_points", "dim"].filter((k) => s[k] !== undefined);
    if (globals.length) {
      diagSection.append(h("dl", { class: "job-head" }, globals.map((k) => [h("dt", {}, k), h("dd", {}, fmtNum(s[k]))])));
    }
    // Histograms: in the summary when the worker puts them there, else its histogram artifact.
    let histograms = s.histograms || s.lid_histogram || null;
    const histArtifact = artifactList.find((a) => a.name.endsWith("histogram.json"));
    if (!histograms && histArtifact) {
      try {
        const r = await api(`/v1/jobs/${jobId}/artifacts/${histArtifact.name}`, { raw: true });
        histograms = (await r.json()).histograms;
      } catch (_) { /* shown without a histogram */ }
    }
    if (stale(generation) || !histograms) return;
    const options = Object.entries(histograms).flatMap(([e, byK]) => Object.keys(byK).map((k) => `${e}|${k}`));
    if (!options.length) return;
    const select = h("select", { id: "hist-select" }, options.map((o) => h("option", { value: o }, o.replace("|", ", k="))));
    const figure = chartFigure("histogram", "LID histogram (log-spaced bins)");
    diagSection.append(h("label", { for: "hist-select", class: "inline" }, "Estimator and k", select), figure);
    const chart = new Chart(figure.querySelector("canvas"), {
      type: "bar",
      data: { labels: [], datasets: [] },
      options: { animation: false, maintainAspectRatio: false,
        scales: { x: { title: { display: true, text: "LID (bin lower edge)" } }, y: { title: { display: true, text: "points" } } },
        plugins: { legend: { display: false } } },
    });
    session.charts.push(chart);
    const draw = () => {
      const [e, k] = select.value.split("|");
      const hist = histograms[e][k];
      const start = hist.counts.findIndex((c) => c > 0);
      const end = hist.counts.length - [...hist.counts].reverse().findIndex((c) => c > 0);
      const lo = Math.max(0, start - 2), hi = Math.min(hist.counts.length, end + 2);
      chart.data.labels = hist.edges.slice(lo, hi).map((v) => fmtNum(v));
      chart.data.datasets = [{ label: `${e} k=${k}`, data: hist.counts.slice(lo, hi), backgroundColor: COLORS[0] }];
      chart.update("none");
      figure.dataset.points = String(hi - lo);
      figure.querySelector(".sr-only").textContent = `Histogram of ${hist.counts.reduce((a, b) => a + b, 0)} LIDs for ${e}, k=${k}.`;
    };
    select.addEventListener("change", draw);
    draw();
  }

  async function refresh() {
    try {
      job = await api(`/v1/jobs/${jobId}`);
      const fresh = (await api(`/v1/jobs/${jobId}/metrics${lastStep === null ? "" : `?since=${lastStep}`}`)).series;
      if (stale(generation)) return;
      for (const [name, points] of Object.entries(fresh)) {
        if (!points.length) continue;
        // A resumed attempt may replay steps: keep one value per step, the newest.
        const byStep = new Map((series[name] || []).map((p) => [p.step, p]));
        for (const p of points) byStep.set(p.step, p);
        series[name] = [...byStep.values()].sort((a, b) => a.step - b.step);
        lastStep = Math.max(lastStep ?? -1, points[points.length - 1].step);
      }
      renderHead();
      updateCharts();
      await refreshEvents();
      await refreshArtifacts();
      if (!ACTIVE.has(job.state)) {
        // Finished: nothing will change until a retry (which polls again).
        session.timers.forEach(clearInterval);
        session.timers = [];
      }
    } catch (err) {
      if (!stale(generation)) notify(err.status === 404 ? "No such job in your team." : err.message, true);
    }
  }
  every(POLL_MS, refresh);
}

async function downloadArtifact(jobId, name) {
  try {
    const response = await api(`/v1/jobs/${jobId}/artifacts/${name}`, { raw: true });
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    const a = h("a", { href: url, download: name.split("/").pop() });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    notify(`Downloaded ${name}.`);
  } catch (err) {
    notify(err.message, true);
  }
}

// Compare -------------------------------------------------------------------------------

function renderCompare(view, params) {
  document.title = "Compare · LDReg";
  const generation = session.generation;
  const ids = (params.get("jobs") || "").split(",").map((s) => s.trim()).filter(Boolean);
  view.append(h("h1", {}, "Compare jobs"));

  const idsInput = h("input", { id: "compare-ids", value: ids.join(","), size: 60, "aria-describedby": "compare-hint" });
  const pick = h("div", { class: "pick-list", id: "compare-pick", role: "group", "aria-label": "Recent jobs" }, h("p", { class: "empty" }, "Loading jobs…"));
  const form = h("form", { class: "panel", id: "compare-form" },
    h("label", { for: "compare-ids" }, "Job ids (comma separated)", idsInput),
    h("p", { class: "hint", id: "compare-hint" }, "Or tick two or more recent jobs:"),
    pick,
    h("p", {}, h("button", { type: "submit" }, "Compare")));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const chosen = idsInput.value.split(",").map((s) => s.trim()).filter(Boolean);
    if (chosen.length < 2) { notify("Choose at least two jobs.", true); return; }
    location.hash = `#/compare?jobs=${chosen.join(",")}`;
  });
  view.append(form);
  api("/v1/jobs?limit=30").then(({ jobs }) => {
    if (stale(generation)) return;
    pick.replaceChildren(...jobs.map((j) => {
      const box = h("input", { type: "checkbox", value: j.id, checked: ids.includes(j.id) });
      box.addEventListener("change", () => {
        const cur = idsInput.value.split(",").map((s) => s.trim()).filter(Boolean);
        const next = box.checked ? [...new Set([...cur, j.id])] : cur.filter((x) => x !== j.id);
        idsInput.value = next.join(",");
      });
      return h("label", { class: "inline" }, box, `${jobTitle(j)} — ${j.kind}, ${methodOf(j)}, LDReg ${ldregOf(j)}, ${j.state}`);
    }));
  }).catch((err) => notify(err.message, true));

  if (ids.length < 2) return;
  const summary = h("section", { id: "compare-summary", "aria-labelledby": "cmp-sum-title" }, h("h2", { id: "cmp-sum-title" }, "Summary"));
  const grid = h("div", { class: "charts", id: "compare-charts" });
  view.append(summary, h("section", { "aria-labelledby": "cmp-curves-title" }, h("h2", { id: "cmp-curves-title" }, "Curves"), grid));
  const figures = {};

  async function refresh() {
    let comparison = null;
    try {
      comparison = await api(`/v1/compare?jobs=${ids.map(encodeURIComponent).join(",")}`);
    } catch (err) {
      if (stale(generation)) return;
      if (err.status !== 404 || err.field) notify(err.message, true);
    }
    let jobs;
    try {
      jobs = await Promise.all(ids.map((id) => api(`/v1/jobs/${id}`)));
    } catch (err) {
      if (!stale(generation)) notify(err.message, true);
      return;
    }
    const metrics = await Promise.all(ids.map((id) => api(`/v1/jobs/${id}/metrics`).then((m) => m.series)));
    if (stale(generation)) return;
    renderComparisonSummary(summary, jobs, metrics, comparison);
    const names = [...PLOTS.flatMap((p) => p.series), ...new Set(metrics.flatMap((m) => Object.keys(m)))]
      .filter((n, i, all) => all.indexOf(n) === i && !HIDDEN_SERIES.has(n) && metrics.some((m) => m[n] && m[n].length));
    for (const name of names) {
      if (!figures[name]) {
        const figure = chartFigure(`cmp-${name.replace(/[^a-z0-9_-]/gi, "_")}`, name);
        grid.append(figure);
        figures[name] = { figure, chart: makeLineChart(figure, [], { yTitle: name }) };
      }
      const { figure, chart } = figures[name];
      setChartData(chart, figure, jobs.map((j, i) => dataset(`${jobTitle(j)} (${methodOf(j)}, LDReg ${ldregOf(j)})`, toXY(metrics[i][name] || []), i, i)));
    }
    if (jobs.every((j) => !ACTIVE.has(j.state))) {
      session.timers.forEach(clearInterval);
      session.timers = [];
    }
  }
  every(POLL_MS * 2, refresh);
}

function renderComparisonSummary(section, jobs, metrics, comparison) {
  const last = (pts) => (pts && pts.length ? pts.reduce((a, b) => (b.step >= a.step ? b : a)).value : undefined);
  const names = PLOTS.flatMap((p) => p.series).filter((n) => metrics.some((m) => m[n] && m[n].length));
  // Geometric-mean LIDs as the compare endpoint reports them (pretrain: MLE lid_gmean_k*).
  const lidRows = [];
  if (comparison) {
    const byId = Object.fromEntries(comparison.jobs.map((j) => [j.id, j.lid_gmean || {}]));
    const keys = [...new Set(comparison.jobs.flatMap((j) => Object.entries(j.lid_gmean || {})
      .flatMap(([e, byK]) => Object.keys(byK).map((k) => `${e}|${k}`))))];
    keys.sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
    for (const key of keys) {
      const [e, k] = key.split("|");
      lidRows.push([`LID gmean ${e} k=${k}`, jobs.map((j) => fmtNum(((byId[j.id] || {})[e] || {})[k]))]);
    }
  }
  const rows = [
    ["state", jobs.map((j) => stateBadge(j.state))],
    ["kind", jobs.map((j) => j.kind)],
    ["method", jobs.map(methodOf)],
    ["LDReg", jobs.map(ldregOf)],
    ["epoch", jobs.map((j) => (j.progress.epochs ? `${j.progress.epoch}/${j.progress.epochs}` : "–"))],
    ...names.map((n) => [`final ${n}`, metrics.map((m) => fmtNum(last(m[n])))]),
    ...lidRows,
  ];
  const table = h("table", { id: "compare-table" },
    h("caption", {}, comparison ? "The first job is the baseline." : ""),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, ""), jobs.map((j) => h("th", { scope: "col" }, h("a", { href: `#/jobs/${j.id}` }, jobTitle(j)))))),
    h("tbody", {}, rows.map(([label, values]) => h("tr", {}, h("th", { scope: "row" }, label), values.map((v) => h("td", {}, v))))));
  const parts = [h("h2", { id: "cmp-sum-title" }, "Summary"), table];
  const distances = comparison ? comparison.distances.flatMap((d) => d.lid.map((x) => ({ ...x, job_id: d.job_id }))) : [];
  if (distances.length) {
    const title = Object.fromEntries(jobs.map((j) => [j.id, jobTitle(j)]));
    parts.push(h("h3", {}, "LID distances to the baseline"), h("table", { id: "compare-distances" },
      h("thead", {}, h("tr", {}, ["job", "estimator", "k", "baseline LID", "LID", "Fisher–Rao", "ln ratio", "W1 (ln LID)"]
        .map((c, i) => h("th", { scope: "col", class: i > 2 ? "num" : null }, c)))),
      h("tbody", {}, distances.map((d) => h("tr", {},
        h("td", {}, title[d.job_id] || d.job_id.slice(0, 12)), h("td", {}, d.estimator), h("td", {}, String(d.k)),
        [d.gmean_baseline, d.gmean, d.fisher_rao, d.log_ratio, d.wasserstein_log_lid].map((v) => h("td", { class: "num" }, fmtNum(v))))))));
    const defs = comparison.definitions || {};
    parts.push(h("dl", { class: "definitions" }, Object.entries(defs).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
  }
  replaceIfChanged(section, ...parts);
}

// Submit --------------------------------------------------------------------------------

const SUBMIT_FIELDS = [
  { legend: "Job", fields: [
    { path: "name", label: "Name", type: "text", value: "", hint: "optional" },
    { path: "spec.method", label: "Method", choices: ["PretrainSpec", "method"], value: "simclr" },
    { path: "spec.backbone", label: "Backbone", choices: ["PretrainSpec", "backbone"], value: "resnet18" },
    { path: "spec.width", label: "ResNet width", type: "number", value: "", hint: "blank: 64 (standard)" },
    { path: "spec.epochs", label: "Epochs", type: "number", value: "20" },
    { path: "spec.batch_size", label: "Batch size", type: "number", value: "256" },
    { path: "spec.seed", label: "Seed", type: "number", value: "0" },
  ] },
  { legend: "Dataset", fields: [
    { path: "spec.dataset.name", label: "Dataset", choices: ["DatasetSpec", "name"], value: "digits" },
    { path: "spec.dataset.path", label: "Path under the data root", type: "text", value: "", hint: "file-based datasets only" },
    { path: "spec.dataset.image_size", label: "Image size", type: "number", value: "", hint: "blank: dataset default" },
  ] },
  { legend: "Optimizer", fields: [
    { path: "spec.optimizer.name", label: "Optimizer", choices: ["OptimizerSpec", "name"], value: "lars" },
    { path: "spec.optimizer.lr", label: "Learning rate", type: "number", step: "any", value: "0.3" },
    { path: "spec.optimizer.weight_decay", label: "Weight decay", type: "number", step: "any", value: "0.000001" },
  ] },
  { legend: "LDReg", toggle: "ldreg-on", fields: [
    { path: "spec.ldreg.alpha", label: "α", type: "number", step: "any", value: "", hint: "blank: the method's official α" },
    { path: "spec.ldreg.k", label: "k (neighbours)", type: "number", value: "64" },
    { path: "spec.ldreg.estimator", label: "Estimator", choices: ["LDRegSpec", "estimator"], value: "mom" },
    { path: "spec.ldreg.target", label: "Target", choices: ["LDRegSpec", "target"], value: "features" },
    { path: "spec.ldreg.warmup_epochs", label: "Warm-up epochs (term off)", type: "number", value: "10" },
  ] },
  { legend: "Evaluation", fields: [
    { path: "spec.eval.lid_k", label: "LID k (comma separated)", type: "text", value: "32, 512" },
  ] },
];

// The choices of a select come from the API's schema (OpenAPI enums, derived from the
// server's registry), never from a list kept here: [component, property].
let schemasPromise = null;

function specSchemas() {
  schemasPromise ??= fetch("/openapi.json").then((r) => {
    if (!r.ok) throw new Error(`openapi.json: HTTP ${r.status}`);
    return r.json();
  }).then((doc) => doc.components.schemas);
  return schemasPromise;
}

async function fillChoices(form) {
  const schemas = await specSchemas();
  for (const group of SUBMIT_FIELDS) {
    for (const f of group.fields) {
      if (!f.choices) continue;
      const [component, property] = f.choices;
      const values = schemas[component]?.properties?.[property]?.enum || [f.value];
      const select = form.querySelector(`#${fieldId(f.path)}`);
      const current = select.value || f.value;
      select.replaceChildren(...values.map((v) => h("option", { value: v, selected: v === current }, v)));
    }
  }
}

function fieldId(path) {
  return `f-${path.replace(/\./g, "-")}`;
}

function renderSubmit(view) {
  document.title = "Submit · LDReg";
  const formErrors = h("div", { class: "form-errors", id: "form-errors", role: "alert", tabindex: "-1" });
  const ldregToggle = h("input", { type: "checkbox", id: "ldreg-on", checked: true });
  const form = h("form", { id: "submit-form", novalidate: true },
    h("h1", {}, "New pretrain job"),
    h("p", { class: "hint" }, "Defaults are the service's. The server validates the spec; its errors appear next to the field."),
    formErrors,
    SUBMIT_FIELDS.map((group) => h("fieldset", {},
      h("legend", {}, group.legend),
      group.toggle ? h("label", { class: "inline", for: "ldreg-on" }, ldregToggle, "Train with the LDReg term (off: plain baseline)") : null,
      h("div", { class: "form-grid" }, group.fields.map((f) => {
        const id = fieldId(f.path);
        const describedBy = [`${id}-error`, f.hint ? `${id}-hint` : null].filter(Boolean).join(" ");
        // Until the schema's choices arrive (fillChoices), a select offers its default.
        const control = f.choices
          ? h("select", { id, name: f.path, "data-field": f.path, "aria-describedby": describedBy }, h("option", { value: f.value, selected: true }, f.value))
          : h("input", { id, name: f.path, "data-field": f.path, type: f.type, step: f.step, value: f.value, "aria-describedby": describedBy });
        return h("div", {},
          h("label", { for: id }, f.label, control),
          f.hint ? h("div", { class: "hint", id: `${id}-hint` }, f.hint) : null,
          h("div", { class: "field-error", id: `${id}-error` }));
      })))),
    h("button", { type: "submit", id: "submit-job" }, "Submit job"));
  ldregToggle.addEventListener("change", () => {
    for (const el of form.querySelectorAll("[data-field^='spec.ldreg.']")) el.disabled = !ldregToggle.checked;
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form, formErrors);
    const body = { kind: "pretrain", spec: {} };
    for (const el of form.querySelectorAll("[data-field]")) {
      if (el.disabled) continue;
      let value = el.value.trim();
      if (value === "") continue;
      if (el.dataset.field === "spec.eval.lid_k") value = value.split(",").map((v) => (v.trim() === "" || isNaN(Number(v)) ? v.trim() : Number(v)));
      else if (el.type === "number") value = Number(value);
      setPath(body, el.dataset.field, value);
    }
    if (!ldregToggle.checked) body.spec.ldreg = null;
    try {
      const job = await api("/v1/jobs", { method: "POST", json: body });
      location.hash = `#/jobs/${job.id}`;
      notify(`Submitted job ${job.id}.`);
    } catch (err) {
      showErrors(form, formErrors, err);
    }
  });
  view.append(form);
  fillChoices(form).catch((err) => notify(`Could not load the choices: ${err.message}`, true));
}

function setPath(obj, path, value) {
  const parts = path.split(".");
  let cur = obj;
  for (const p of parts.slice(0, -1)) cur = cur[p] = cur[p] || {};
  cur[parts[parts.length - 1]] = value;
}

function clearErrors(form, formErrors) {
  formErrors.replaceChildren();
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
}

/* Put each of the server's field errors next to its field: the field named exactly, or
 * the nearest enclosing one ("spec.eval.lid_k.1" → spec.eval.lid_k); errors about the
 * spec as a whole go above the form. */
function showErrors(form, formErrors, err) {
  const details = err.details && err.details.length ? err.details : [{ field: err.field || "", message: err.message }];
  let first = null;
  for (const d of details) {
    let path = d.field || "";
    let control = null;
    while (path && !(control = form.querySelector(`[data-field="${CSS.escape(path)}"]`))) {
      path = path.split(".").slice(0, -1).join(".");
    }
    if (control) {
      control.setAttribute("aria-invalid", "true");
      const box = document.getElementById(`${control.id}-error`);
      box.textContent = box.textContent ? `${box.textContent}; ${d.message}` : d.message;
      first = first || control;
    } else {
      formErrors.append(h("p", {}, d.field ? `${d.field}: ${d.message}` : d.message));
    }
  }
  if (err.status !== 422) formErrors.append(h("p", {}, `${err.status} ${err.code}: ${err.message}`));
  (first || formErrors).focus?.();
  notify(err.status === 422 ? "The server rejected the spec; see the marked fields." : err.message, true);
}

// ---------------------------------------------------------------------------------------

document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
window.addEventListener("hashchange", render);
render();
