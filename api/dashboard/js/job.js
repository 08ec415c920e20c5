// One job: state, live charts, events, artifacts, diagnosis.
import { axisContext, chartControls, chartFigure, makeLineChart, seriesDatasets, setChartData } from "./charts.js";
import { ACTIVE, COLORS, HIDDEN_SERIES, LOG_POLL_MS, MAX_POINTS, PLOTS, POLL_MS, api, every, fmtBytes, fmtNum, fmtTime, h, isPlotted, jobTitle, ldregOf, methodOf, notify, plotSeries, progressCell, replaceIfChanged, session, stale, stateBadge } from "./core.js";

export function renderJob(view, jobId) {
  const generation = session.generation;
  const head = h("section", { class: "job-head", "aria-label": "Job" });
  const errorBox = h("div", { id: "job-error" });
  const plotsSection = h("section", { "aria-labelledby": "plots-title" }, h("h2", { id: "plots-title" }, "Metrics"));
  const diagSection = h("section", { id: "diagnosis", hidden: true, "aria-labelledby": "diag-title" }, h("h2", { id: "diag-title" }, "Diagnosis"));
  const timeline = h("ol", { class: "timeline", id: "events" });
  const artifacts = h("div", { id: "artifacts" });
  const spec = h("pre", { class: "spec mono", id: "spec" });
  const logPanel = jobLogPanel(jobId, generation);
  view.append(
    h("p", {}, h("a", { href: "#/jobs" }, "← All jobs")),
    head, errorBox, plotsSection, diagSection, logPanel.section,
    h("section", { "aria-labelledby": "events-title" }, h("h2", { id: "events-title" }, "Events"), timeline),
    h("section", { "aria-labelledby": "artifacts-title" }, h("h2", { id: "artifacts-title" }, "Artifacts"), artifacts),
    h("section", { "aria-labelledby": "spec-title" }, h("h2", { id: "spec-title" }, "Spec"), spec));

  const series = {};
  let lastStep = null;
  let seenAttempt = null;
  let charts = null;
  let extraCharts = {};
  let chartGrid = null;
  let job = null;
  let artifactNames = "";

  function setupCharts() {
    chartGrid = h("div", { class: "charts", id: "charts" });
    plotsSection.append(chartControls(updateCharts), chartGrid);
    charts = PLOTS.map((plot) => {
      const figure = chartFigure(plot.id, plot.title);
      chartGrid.append(figure);
      return { plot, figure, chart: makeLineChart(figure, [], { yTitle: plot.yTitle, y2Title: plot.y2Title }) };
    });
  }

  function updateCharts() {
    // A diagnosis has no training curves: its results are the Diagnosis section.
    plotsSection.hidden = job.kind !== "pretrain" && !Object.keys(series).length;
    if (plotsSection.hidden) return;
    if (!charts) setupCharts();
    const ctx = axisContext(job, series);
    for (const { plot, figure, chart } of charts) {
      const datasets = plotSeries(plot, series).flatMap((n, i) =>
        seriesDatasets(n, series[n], i, { ctx, yAxisID: (plot.rightAxis || []).includes(n) ? "y2" : "y" }));
      setChartData(chart, figure, datasets);
    }
    const others = Object.keys(series).filter((n) => !isPlotted(n) && !HIDDEN_SERIES.has(n)).sort();
    for (const name of others.slice(0, 12)) {
      if (!extraCharts[name]) {
        const figure = chartFigure(`extra-${name.replace(/[^a-z0-9_-]/gi, "_")}`, name);
        chartGrid.append(figure);
        extraCharts[name] = { figure, chart: makeLineChart(figure, [], { yTitle: name }) };
      }
      const { figure, chart } = extraCharts[name];
      setChartData(chart, figure, seriesDatasets(name, series[name], 4, { ctx }));
    }
  }

  // The buttons are made once; each poll only sets whether they can be pressed.
  const headInfo = h("div", { class: "job-info" });
  const cancel = h("button", { type: "button", id: "cancel-job", class: "danger", disabled: true, "aria-expanded": "false", "aria-controls": "cancel-confirm" }, "Cancel");
  const retry = h("button", { type: "button", id: "retry-job", class: "secondary", disabled: true, "aria-describedby": "retry-reason" }, "Retry");
  const resubmit = h("a", { class: "button secondary", id: "resubmit-job", href: `#/jobs/${encodeURIComponent(jobId)}/resubmit` }, "Resubmit with changes");
  const retryReason = h("p", { class: "hint action-reason", id: "retry-reason" });
  // Cancelling asks first: the run stops and its progress since the last checkpoint is lost.
  const confirmCancel = h("button", { type: "button", id: "confirm-cancel", class: "danger" }, "Yes, cancel it");
  const keepRunning = h("button", { type: "button", id: "keep-running", class: "secondary" }, "Keep it");
  const cancelBox = h("div", { class: "confirm", id: "cancel-confirm", role: "alertdialog", "aria-labelledby": "cancel-confirm-text", hidden: true },
    h("p", { id: "cancel-confirm-text" }, "Cancel this job? A running job stops within a few steps; a retry later resumes from its last checkpoint."),
    h("div", { class: "actions" }, confirmCancel, keepRunning));
  cancel.addEventListener("click", () => {
    cancelBox.hidden = false;
    cancel.setAttribute("aria-expanded", "true");
    confirmCancel.focus();
  });
  const closeConfirm = () => {
    cancelBox.hidden = true;
    cancel.setAttribute("aria-expanded", "false");
  };
  keepRunning.addEventListener("click", () => { closeConfirm(); cancel.focus(); });
  confirmCancel.addEventListener("click", () => { closeConfirm(); act("cancel"); });
  retry.addEventListener("click", () => act("retry"));
  head.append(headInfo, h("div", { class: "job-actions" }, h("div", { class: "actions" }, cancel, retry, resubmit), retryReason, cancelBox));

  function renderHead() {
    document.title = `${jobTitle(job)} · LDReg`;
    cancel.disabled = !ACTIVE.has(job.state) || job.state === "cancelling";
    if (cancel.disabled) closeConfirm();
    const reason = retryBlocked(job);
    retry.disabled = reason !== null;
    retry.title = reason || "Queue it again; it resumes from its last checkpoint";
    if (retryReason.textContent !== (reason || "")) retryReason.textContent = reason || "";
    const rows = [
      ["State", stateBadge(job.state)],
      ["Kind", job.kind],
      job.parent_id ? ["Sweep", h("a", { href: `#/jobs/${job.parent_id}`, id: "parent-sweep" }, `${job.sweep_arm}, seed ${job.sweep_seed}`)] : null,
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
      h("strong", {}, `Failed: ${job.error.code}`), h("p", {}, job.error.message),
      job.error.kind === "user" ? h("p", { class: "hint" }, "The job's own input failed it: change the spec (Resubmit with changes).") : null));
    const specText = JSON.stringify(job.spec, null, 2);
    if (spec.textContent !== specText) spec.textContent = specText;
  }

  async function act(action) {
    try {
      job = await api(`/v1/jobs/${jobId}/${action}`, { method: "POST" });
      notify(action === "cancel" ? `Cancellation requested (${job.state}).` : `Job requeued (${job.state}).`);
      renderHead();
      if (action === "retry") {
        every(POLL_MS, refresh);
        logPanel.start();
      }
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
      figure.querySelector(".chart-empty").hidden = hi > lo;
      figure.querySelector(".sr-only").textContent = `Histogram of ${hist.counts.reduce((a, b) => a + b, 0)} LIDs for ${e}, k=${k}.`;
    };
    select.addEventListener("change", draw);
    draw();
  }

  async function refresh() {
    try {
      job = await api(`/v1/jobs/${jobId}`);
      // A new attempt replays the epochs after its checkpoint: read the curves afresh.
      if (seenAttempt !== null && job.attempt !== seenAttempt) lastStep = null;
      seenAttempt = job.attempt;
      // The first read (and a fresh one) is thinned on the server; later ones bring only
      // the new steps.
      const whole = lastStep === null;
      const query = whole ? `max_points=${MAX_POINTS}` : `since=${lastStep}`;
      const fresh = (await api(`/v1/jobs/${jobId}/metrics?${query}`)).series;
      if (stale(generation)) return;
      if (whole) for (const name of Object.keys(series)) delete series[name];
      for (const [name, points] of Object.entries(fresh)) {
        if (!points.length) continue;
        // A resumed attempt may replay steps: keep one value per step, the newest.
        const byStep = new Map((series[name] || []).map((p) => [p.step, p]));
        for (const p of points) byStep.set(p.step, p);
        series[name] = [...byStep.values()].sort((a, b) => a.step - b.step);
        lastStep = Math.max(lastStep ?? -1, points[points.length - 1].step);
      }
      // A long run followed for hours: read it thinned again rather than keep every step.
      if (Object.values(series).some((points) => points.length > 2 * MAX_POINTS)) lastStep = null;
      renderHead();
      updateCharts();
      logPanel.update(job);
      await refreshEvents();
      await refreshArtifacts();
      if (!ACTIVE.has(job.state)) {
        // Finished: nothing will change until a retry (which polls again). The log is
        // read once more, to its end.
        session.timers.forEach(clearInterval);
        session.timers = [];
        logPanel.finish();
      }
    } catch (err) {
      if (!stale(generation)) notify(err.status === 404 ? "No such job in your team." : err.message, true);
    }
  }
  logPanel.start();
  every(POLL_MS, refresh);
}

/* Why Retry cannot be pressed, or null when it can: only a failed or cancelled job is
 * retried, and not one that failed on its own input (error.kind "user": it would fail
 * the same way; the spec must change). */
export function retryBlocked(job) {
  if (ACTIVE.has(job.state)) return `Retry is for a failed or cancelled job; this one is ${job.state}.`;
  if (job.state === "succeeded") return "It succeeded: nothing to retry. Resubmit with changes to run it again.";
  if (job.state === "failed" && job.error && job.error.kind === "user") {
    return `It failed on its own input (${job.error.code}): a retry would fail the same way. Resubmit with changes.`;
  }
  return null;
}

const LOG_MAX_CHARS = 400000;
const LOG_FIRST_LINES = 2000;

/* The job's log, followed live: every second, the lines written since the last read
 * (GET /v1/jobs/{id}/logs with the offset it returned), until the job has finished; the
 * latest attempt's, going on to the next attempt when there is one, or a chosen one's. */
export function jobLogPanel(jobId, generation) {
  const pre = h("pre", { class: "log mono", id: "job-log", tabindex: "0", "aria-labelledby": "log-title", "data-lines": "0", hidden: true });
  const empty = h("p", { class: "empty", id: "job-log-empty" }, "No log yet: it starts when a worker takes the job.");
  const attemptSelect = h("select", { id: "log-attempt" }, h("option", { value: "" }, "latest"));
  const followBox = h("input", { type: "checkbox", id: "log-follow", checked: true });
  const status = h("span", { class: "hint", id: "log-status", role: "status" });
  const section = h("section", { id: "log", "aria-labelledby": "log-title" },
    h("h2", { id: "log-title" }, "Log"),
    h("div", { class: "row log-controls" },
      h("label", { for: "log-attempt" }, "Attempt", attemptSelect),
      h("label", { class: "inline", for: "log-follow" }, followBox, "Scroll with new lines"),
      status),
    empty, pre);

  let chosen = null;  // an attempt picked in the select; null: the latest
  let shown = 0;  // the attempt whose lines the panel holds (0: none yet)
  let offset = 0;
  let lines = 0;
  let job = null;
  let busy = false;

  function reset() {
    pre.textContent = "";
    pre.hidden = true;
    empty.hidden = false;
    shown = chosen || 0;
    offset = 0;
    lines = 0;
    pre.dataset.lines = "0";
  }

  function append(text) {
    if (!text) return;
    pre.append(text);
    lines += (text.match(/\n/g) || []).length;
    if (pre.textContent.length > LOG_MAX_CHARS) {
      // Keep the newer half, from a line's start.
      const kept = pre.textContent.slice(-LOG_MAX_CHARS / 2);
      pre.textContent = kept.slice(kept.indexOf("\n") + 1);
    }
    pre.dataset.lines = String(lines);
    pre.hidden = false;
    empty.hidden = true;
    if (followBox.checked) pre.scrollTop = pre.scrollHeight;
  }

  // One read; true once the shown attempt's log is complete and read to its end, with
  // no later attempt to go on to.
  async function read() {
    if (busy || stale(generation)) return false;
    busy = true;
    try {
      const q = new URLSearchParams({ since: String(offset) });
      if (shown > 0) q.set("attempt", String(shown));
      if (offset === 0 && lines === 0) q.set("tail", String(LOG_FIRST_LINES));  // a long log: its end
      const response = await api(`/v1/jobs/${encodeURIComponent(jobId)}/logs?${q}`, { raw: true });
      const text = await response.text();
      if (stale(generation)) return true;
      const attempt = Number(response.headers.get("X-Log-Attempt") || 0);
      if (shown === 0) shown = attempt;
      append(text);
      offset = Number(response.headers.get("X-Log-Offset") || offset);
      const complete = response.headers.get("X-Log-Complete") === "true";
      const drained = complete && offset >= Number(response.headers.get("X-Log-Size") || 0);
      const next = job && chosen === null && job.attempt > shown && shown > 0 ? job.attempt : null;
      if (drained && next) {
        append(`==> attempt ${next} <==\n`);
        shown = next;
        offset = 0;
      }
      status.textContent = shown ? `attempt ${shown} · ${drained && !next ? "complete" : "live"}` : "waiting for the first attempt";
      section.dataset.state = drained && !next ? "complete" : "live";
      return drained && !next;
    } catch (err) {
      if (!stale(generation)) status.textContent = `Could not read the log: ${err.message}`;
      return false;
    } finally {
      busy = false;
    }
  }

  attemptSelect.addEventListener("change", () => {
    chosen = attemptSelect.value ? Number(attemptSelect.value) : null;
    reset();
    read();
  });

  return {
    section,
    start() {
      session.timers.push(setInterval(read, LOG_POLL_MS));
      read();
    },
    update(j) {
      job = j;
      const options = ["", ...Array.from({ length: job.attempt }, (_, i) => String(i + 1))];
      if ([...attemptSelect.options].map((o) => o.value).join() !== options.join()) {
        attemptSelect.replaceChildren(...options.map((v) => h("option", { value: v, selected: v === String(chosen || "") }, v || "latest")));
      }
    },
    // The job has finished: read on until its log has been read to the end.
    async finish() {
      for (let i = 0; i < 30 && !stale(generation); i += 1) {
        if (!busy && (await read())) return;
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
    },
  };
}

export async function downloadArtifact(jobId, name) {
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
