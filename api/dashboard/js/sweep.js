// A sweep's page (docs/sweeps.md): its verdicts as a forest plot per metric, each arm's
// curves, its children.
import { axisContext, chartControls, chartFigure, makeLineChart, seriesDatasets, setChartData } from "./charts.js";
import { ACTIVE, COLORS, DASHES, POLL_MS, api, every, fmtNum, fmtTime, h, jobTitle, notify, progressCell, replaceIfChanged, session, stale, stateBadge } from "./core.js";
import { renderJob } from "./job.js";

// Each child's curves on the sweep page: one line per child, coloured by arm.
export const SWEEP_CURVES = [
  { name: "loss", title: "Training loss, one line per child (colour: arm; dash: seed)" },
  { name: "knn_acc", title: "Held-out kNN accuracy, one line per child (colour: arm; dash: seed)" },
];
// Curves are read for at most this many children (a sweep may have 200).
const MAX_CURVE_CHILDREN = 60;
const CURVE_POINTS = 300;

/* The page of #/jobs/<id>: a sweep's own, else the job page. */
export async function renderJobOrSweep(view, jobId) {
  const generation = session.generation;
  let job = null;
  try {
    job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
  } catch (_) { /* the job page says why */ }
  if (stale(generation)) return;
  if (job && job.kind === "sweep") return renderSweep(view, job);
  return renderJob(view, jobId);
}

const fmtSigned = (v) => (v === null || v === undefined ? "–" : `${v >= 0 ? "+" : ""}${fmtNum(v)}`);
const fmtCI = (ci) => (ci && ci[0] !== null && ci[1] !== null ? `[${fmtNum(ci[0])}, ${fmtNum(ci[1])}]` : "no interval");
const safeId = (name) => name.replace(/[^a-z0-9_-]/gi, "_");

/* Draws, behind the points, the noise-floor band (±floor, shaded) and a vertical line at
 * 0 (options.plugins.forestBackdrop: {floor, zero}). */
const forestBackdrop = {
  id: "forestBackdrop",
  beforeDatasetsDraw(chart, _args, opts) {
    const { ctx, chartArea: area, scales: { x } } = chart;
    ctx.save();
    if (opts.floor) {
      const left = Math.max(x.getPixelForValue(-opts.floor), area.left);
      const right = Math.min(x.getPixelForValue(opts.floor), area.right);
      ctx.fillStyle = "rgba(86, 180, 233, 0.22)";
      if (right > left) ctx.fillRect(left, area.top, right - left, area.bottom - area.top);
    }
    if (opts.zero) {
      const zero = x.getPixelForValue(0);
      if (zero >= area.left && zero <= area.right) {
        ctx.strokeStyle = "#1b1f24";
        ctx.lineWidth = 1.5;
        ctx.setLineDash([5, 4]);
        ctx.beginPath();
        ctx.moveTo(zero, area.top);
        ctx.lineTo(zero, area.bottom);
        ctx.stroke();
      }
    }
    ctx.restore();
  },
};

/* One metric's forest plot: a row per arm, its paired effect against the baseline as a
 * point and its interval as a horizontal bar (without a baseline: the arm's own mean). */
function forestChart(figure) {
  const chart = new Chart(figure.querySelector("canvas"), {
    type: "scatter",
    data: { datasets: [] },
    plugins: [forestBackdrop],
    options: {
      animation: false,
      maintainAspectRatio: false,
      scales: {
        x: { type: "linear", grace: "8%", title: { display: true, text: "effect (arm − baseline)" } },
        y: { type: "linear", reverse: true, min: -0.5, max: 0.5, grid: { display: false },
          ticks: { stepSize: 1, autoSkip: false, callback: () => "" } },
      },
      plugins: {
        legend: { display: false },
        forestBackdrop: { floor: null, zero: true },
        tooltip: { callbacks: { label: (item) => item.raw.label || "" } },
      },
    },
  });
  session.charts.push(chart);
  return chart;
}

function drawForest(chart, figure, report, metric) {
  const paired = report.baseline;
  const rows = report.arms.filter((a) => (paired ? a.effects : true));
  const points = [];
  const datasets = [];
  rows.forEach((arm, i) => {
    const e = paired ? arm.effects[metric] : arm.metrics[metric];
    const value = paired ? e.effect : e.mean;
    const color = COLORS[report.arms.indexOf(arm) % COLORS.length];
    const text = `${arm.name}: ${fmtSigned(value)} ${fmtCI(e.ci)}${paired ? ` · ${e.verdict}` : ""}`;
    if (e.ci && e.ci[0] !== null && e.ci[1] !== null) {
      datasets.push({ data: [{ x: e.ci[0], y: i, label: text }, { x: e.ci[1], y: i, label: text }], showLine: true,
        borderColor: color, backgroundColor: color, borderWidth: 3, pointRadius: 0, pointHitRadius: 6 });
    }
    if (value !== null && value !== undefined) points.push({ x: value, y: i, label: text, color });
  });
  datasets.push({ data: points, pointRadius: 6, pointHoverRadius: 8, pointStyle: "rectRot",
    backgroundColor: points.map((p) => p.color), borderColor: "#1b1f24", borderWidth: 1 });
  const floorEntry = paired && report.noise_floor ? report.noise_floor[metric] : null;
  const floor = floorEntry && floorEntry.ci && floorEntry.ci[0] !== null
    ? Math.max(Math.abs(floorEntry.ci[0]), Math.abs(floorEntry.ci[1])) : null;
  const { x, y } = chart.options.scales;
  x.title.text = paired ? `${metric}: effect (arm − baseline), paired by seed` : `${metric}: mean over seeds (no baseline)`;
  x.suggestedMin = paired ? Math.min(0, floor ? -floor : 0) : undefined;
  x.suggestedMax = paired ? Math.max(0, floor || 0) : undefined;
  y.min = -0.5;
  y.max = Math.max(rows.length, 1) - 0.5;
  // A tick per arm, at its row (the axis would otherwise step from its -0.5 minimum).
  y.afterBuildTicks = (scale) => { scale.ticks = rows.map((_, i) => ({ value: i })); };
  y.ticks.callback = (v) => (Number.isInteger(v) && rows[v] ? rows[v].name : "");
  chart.options.plugins.forestBackdrop = { floor, zero: paired };
  chart.data.datasets = datasets;
  chart.update("none");
  figure.querySelector(".chart-box").style.height = `${Math.max(140, 60 + 44 * rows.length)}px`;
  chart.resize();
  figure.dataset.points = String(points.length);
  figure.querySelector(".chart-empty").hidden = points.length > 0;
  figure.querySelector(".sr-only").textContent = rows.length
    ? rows.map((arm) => {
      const e = paired ? arm.effects[metric] : arm.metrics[metric];
      return `${arm.name}: ${paired ? `effect ${fmtSigned(e.effect)}` : `mean ${fmtNum(e.mean)}`} ${fmtCI(e.ci)}`;
    }).join("; ")
    : "no arms";
}

/* A sweep's progress: its children finished, of all. */
function childrenProgress(job) {
  const { epoch = 0, epochs = 0 } = job.progress || {};
  return h("div", { class: "progress" },
    h("progress", { max: epochs || 1, value: epoch, "aria-label": `${epoch} of ${epochs} children finished` }),
    h("span", { class: "mono" }, `${epoch}/${epochs} finished`));
}

/* The verdicts under one metric's forest plot, in words. */
function verdictList(report, metric) {
  const floor = report.noise_floor && report.noise_floor[metric];
  const items = report.arms.filter((a) => a.effects).map((arm) => {
    const e = arm.effects[metric];
    const beyond = e.beyond_noise_floor === null || e.beyond_noise_floor === undefined ? ""
      : e.beyond_noise_floor ? ", beyond the noise floor" : ", within the noise floor";
    const needed = e.seeds_needed ? `; seeds needed: ${e.seeds_needed}` : "";
    return h("li", { "data-arm": arm.name, "data-outcome": e.outcome },
      h("strong", {}, arm.name), `: ${e.verdict}`, ` — effect ${fmtSigned(e.effect)} ${fmtCI(e.ci)} over ${e.n} paired seeds${beyond}${needed}`);
  });
  const floorText = floor && floor.ci
    ? h("p", { class: "hint" }, `Noise floor (control − baseline): ${fmtSigned(floor.effect)} ${fmtCI(floor.ci)}, shaded as ±${fmtNum(Math.max(Math.abs(floor.ci[0]), Math.abs(floor.ci[1])))}; the dashed line is 0.`)
    : null;
  if (!report.baseline) {
    return h("div", {}, h("p", { class: "hint" }, "No baseline: each arm's mean over its seeds, with its interval (not paired)."));
  }
  return h("div", {}, h("ul", { class: "verdicts", id: `verdicts-${safeId(metric)}` }, items), floorText);
}

export function renderSweep(view, first) {
  const generation = session.generation;
  const jobId = first.id;
  const head = h("section", { class: "job-head", "aria-label": "Sweep" });
  const errorBox = h("div", { id: "job-error" });
  const reportStatus = h("p", { id: "report-status", class: "hint" }, "Loading the report…");
  const forests = h("div", { class: "charts", id: "forests" });
  const notes = h("ul", { class: "notes", id: "report-notes" });
  const failedBox = h("div", { id: "report-failed" });
  const curveGrid = h("div", { class: "charts", id: "sweep-curves" });
  const childRows = h("tbody", { id: "sweep-children-rows" });
  const timeline = h("ol", { class: "timeline", id: "events" });
  const spec = h("pre", { class: "spec mono", id: "spec" });
  view.append(
    h("p", {}, h("a", { href: "#/jobs" }, "← All jobs")),
    head, errorBox,
    h("section", { id: "verdicts", "aria-labelledby": "verdicts-title" },
      h("h2", { id: "verdicts-title" }, "Verdicts"),
      h("p", { class: "hint" }, "Per metric, each arm's effect against the baseline on the same seeds (a point) with its interval (a bar); the shaded band is the noise floor the control arm measures. An interval that excludes 0 is a verdict; read only effects beyond the noise floor."),
      reportStatus, forests, failedBox, notes),
    h("section", { "aria-labelledby": "curves-title" }, h("h2", { id: "curves-title" }, "Curves by arm"),
      chartControls(() => drawCurves()), curveGrid),
    h("section", { "aria-labelledby": "children-title" }, h("h2", { id: "children-title" }, "Children"),
      h("table", { id: "sweep-children", "aria-describedby": "children-caption" },
        h("caption", { id: "children-caption" }, "One pretrain job per arm and seed; each opens as any job."),
        h("thead", {}, h("tr", {}, ["Arm", "Seed", "State", "Progress", "kNN acc.", "Job"].map((c) => h("th", { scope: "col" }, c)))),
        childRows)),
    h("section", { "aria-labelledby": "events-title" }, h("h2", { id: "events-title" }, "Events"), timeline),
    h("section", { "aria-labelledby": "spec-title" }, h("h2", { id: "spec-title" }, "Spec"), spec));

  let job = first;
  let children = [];
  let report = null;
  let signature = null;
  const forestCharts = {};
  const curveCharts = {};
  const curves = {};  // child id -> series
  const curvesFinal = new Set();

  // Buttons, made once.
  const headInfo = h("div", { class: "job-info" });
  const cancel = h("button", { type: "button", id: "cancel-job", class: "danger", disabled: true, "aria-expanded": "false", "aria-controls": "cancel-confirm" }, "Cancel sweep");
  const retry = h("button", { type: "button", id: "retry-job", class: "secondary", disabled: true, "aria-describedby": "retry-reason" }, "Retry failed children");
  const retryReason = h("p", { class: "hint action-reason", id: "retry-reason" });
  const confirmCancel = h("button", { type: "button", id: "confirm-cancel", class: "danger" }, "Yes, cancel every unfinished child");
  const keepRunning = h("button", { type: "button", id: "keep-running", class: "secondary" }, "Keep it");
  const cancelBox = h("div", { class: "confirm", id: "cancel-confirm", role: "alertdialog", "aria-labelledby": "cancel-confirm-text", hidden: true },
    h("p", { id: "cancel-confirm-text" }, "Cancel this sweep? Its queued children end at once, its running ones within a few steps; a retry later runs the cancelled ones again."),
    h("div", { class: "actions" }, confirmCancel, keepRunning));
  cancel.addEventListener("click", () => { cancelBox.hidden = false; cancel.setAttribute("aria-expanded", "true"); confirmCancel.focus(); });
  const closeConfirm = () => { cancelBox.hidden = true; cancel.setAttribute("aria-expanded", "false"); };
  keepRunning.addEventListener("click", () => { closeConfirm(); cancel.focus(); });
  confirmCancel.addEventListener("click", () => { closeConfirm(); act("cancel"); });
  retry.addEventListener("click", () => act("retry"));
  head.append(headInfo, h("div", { class: "job-actions" }, h("div", { class: "actions" }, cancel, retry), retryReason, cancelBox));

  // Arms in the sweep's order (the report's), then seeds in the spec's.
  const armOrder = () => (report ? report.arms.map((a) => a.name) : [...new Set(children.map((c) => c.sweep_arm))]);
  const sortedChildren = () => {
    const arms = armOrder();
    const seeds = job.spec.seeds || [];
    return [...children].sort((a, b) => (arms.indexOf(a.sweep_arm) - arms.indexOf(b.sweep_arm)) || (seeds.indexOf(a.sweep_seed) - seeds.indexOf(b.sweep_seed)));
  };

  function renderHead() {
    document.title = `${jobTitle(job)} · sweep · LDReg`;
    cancel.disabled = !ACTIVE.has(job.state) || job.state === "cancelling";
    if (cancel.disabled) closeConfirm();
    const retriable = children.filter((c) => c.state === "failed" || c.state === "cancelled").length;
    const reason = ACTIVE.has(job.state) ? `Retry is for a finished sweep; this one is ${job.state} (a failed child can be retried on its page).`
      : retriable ? null : "Every child succeeded: nothing to retry.";
    retry.disabled = reason !== null;
    retry.title = reason || `Queue the ${retriable} failed or cancelled children again`;
    if (retryReason.textContent !== (reason || "")) retryReason.textContent = reason || "";
    const grid = job.spec.grid || {};
    const rows = [
      ["State", stateBadge(job.state)],
      ["Kind", "sweep"],
      ["Children", childrenProgress(job)],
      ["Arms", report ? report.arms.map((a) => a.name).join(" · ") : "–"],
      ["Seeds", (job.spec.seeds || []).join(", ")],
      ["Grid", Object.keys(grid).length ? Object.entries(grid).map(([k, v]) => `${k}: ${JSON.stringify(v)}`).join("; ") : "none (the base)"],
      ["Created", fmtTime(job.created_at)],
      ["Started", fmtTime(job.started_at)],
      ["Finished", fmtTime(job.finished_at)],
    ];
    replaceIfChanged(headInfo,
      h("h1", { id: "job-title" }, jobTitle(job), " ", h("span", { class: "mono hint" }, job.id)),
      h("dl", {}, rows.map(([k, v]) => [h("dt", {}, k), h("dd", { "data-field": k.toLowerCase() }, v)])));
    replaceIfChanged(errorBox, job.error && h("div", { class: "error-box", role: "alert" },
      h("strong", {}, `Failed: ${job.error.code}`), h("p", {}, job.error.message)));
    const specText = JSON.stringify(job.spec, null, 2);
    if (spec.textContent !== specText) spec.textContent = specText;
  }

  function renderChildren() {
    const rows = sortedChildren().map((c) => {
      const knn = c.summary && typeof c.summary.knn_acc === "number" ? fmtNum(c.summary.knn_acc) : "–";
      return h("tr", { "data-job-id": c.id, "data-state": c.state },
        h("td", {}, h("span", { class: "swatch", style: `background:${COLORS[armOrder().indexOf(c.sweep_arm) % COLORS.length]}` }), c.sweep_arm),
        h("td", { class: "num" }, String(c.sweep_seed)),
        h("td", {}, stateBadge(c.state)),
        h("td", {}, progressCell(c)),
        h("td", { class: "num" }, knn),
        h("td", {}, h("a", { href: `#/jobs/${c.id}` }, c.id.slice(0, 12))));
    });
    replaceIfChanged(childRows, rows.length ? rows : h("tr", {}, h("td", { colspan: 6, class: "empty" }, "No children.")));
  }

  function renderReport() {
    if (!report) return;
    const children_ = report.children || {};
    const states = Object.entries(children_.by_state || {}).map(([s, n]) => `${n} ${s}`).join(", ");
    reportStatus.textContent = report.complete
      ? `Complete: every one of the ${children_.expected} children has finished (${states}).`
      : `Incomplete: the verdicts so far, from the seeds that have succeeded (${states || "none reported yet"} of ${children_.expected}).`;
    reportStatus.dataset.complete = String(Boolean(report.complete));
    for (const metric of report.metrics) {
      if (!forestCharts[metric]) {
        const figure = chartFigure(`forest-${safeId(metric)}`, `${metric} (${report.directions[metric]} is better)`);
        figure.classList.add("forest");
        const words = h("div", { class: "verdict-text" });
        figure.append(words);
        forests.append(figure);
        forestCharts[metric] = { figure, chart: forestChart(figure), words };
      }
      const { figure, chart, words } = forestCharts[metric];
      drawForest(chart, figure, report, metric);
      replaceIfChanged(words, verdictList(report, metric));
    }
    const failed = report.arms.flatMap((a) => (a.failed || []).map((c) => ({ arm: a.name, ...c })));
    replaceIfChanged(failedBox, failed.length ? h("table", { id: "failed-children" },
      h("caption", {}, "Failed or cancelled children, left out of the pairing (retry them to fill in their seeds)"),
      h("thead", {}, h("tr", {}, ["Arm", "Seed", "State", "Error", "Job"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, failed.map((c) => h("tr", {}, h("td", {}, c.arm), h("td", { class: "num" }, String(c.seed)), h("td", {}, stateBadge(c.state)),
        h("td", {}, c.error ? `${c.error.code}: ${c.error.message}` : "–"),
        h("td", {}, c.job_id ? h("a", { href: `#/jobs/${c.job_id}` }, c.job_id.slice(0, 12)) : "–"))))) : null);
    replaceIfChanged(notes, (report.notes || []).map((n) => h("li", {}, n)));
  }

  function drawCurves() {
    const arms = armOrder();
    const seeds = job.spec.seeds || [];
    for (const { name, title } of SWEEP_CURVES) {
      if (!curveCharts[name]) {
        const figure = chartFigure(`sweep-${safeId(name)}`, title);
        curveGrid.append(figure);
        curveCharts[name] = { figure, chart: makeLineChart(figure, [], { yTitle: name }) };
      }
      const { figure, chart } = curveCharts[name];
      const datasets = sortedChildren().filter((c) => curves[c.id] && curves[c.id][name]).flatMap((c) =>
        seriesDatasets(`${c.sweep_arm} seed=${c.sweep_seed}`, curves[c.id][name], arms.indexOf(c.sweep_arm),
          { dash: seeds.indexOf(c.sweep_seed), ctx: axisContext(c, curves[c.id]) }));
      setChartData(chart, figure, datasets);
    }
  }

  async function refreshCurves() {
    const wanted = sortedChildren().filter((c) => c.state !== "queued" && !curvesFinal.has(c.id)).slice(0, MAX_CURVE_CHILDREN);
    const names = SWEEP_CURVES.map((c) => `name=${c.name}`).join("&");
    await Promise.all(wanted.map(async (c) => {
      try {
        curves[c.id] = (await api(`/v1/jobs/${c.id}/metrics?${names}&name=epoch_seconds&max_points=${CURVE_POINTS}`)).series;
        if (!ACTIVE.has(c.state)) curvesFinal.add(c.id);
      } catch (_) { /* drawn at the next poll */ }
    }));
    if (!stale(generation)) drawCurves();
  }

  async function refreshEvents() {
    const { events } = await api(`/v1/jobs/${jobId}/events`);
    if (stale(generation)) return;
    replaceIfChanged(timeline, events.map((e) => h("li", {},
      h("time", { datetime: e.at }, fmtTime(e.at)),
      h("strong", {}, `${e.from_state || "–"} → ${e.to_state}`),
      e.reason ? h("div", {}, e.reason) : null)));
  }

  async function act(action) {
    try {
      job = await api(`/v1/jobs/${jobId}/${action}`, { method: "POST" });
      notify(action === "cancel" ? `Sweep cancelled (${job.state}).` : `Failed and cancelled children queued again (sweep ${job.state}).`);
      signature = null;
      if (action === "retry") every(POLL_MS, refresh);
      else refresh();
    } catch (err) {
      notify(err.message, true);
    }
  }

  async function refresh() {
    try {
      job = await api(`/v1/jobs/${jobId}`);
      children = (await api(`/v1/jobs?parent=${jobId}&limit=200`)).jobs;
      if (stale(generation)) return;
      // The report is recomputed by the server: read it again only when a child's
      // state changed (or the sweep's).
      const now = `${job.state}|${children.map((c) => `${c.id}:${c.state}`).sort().join(",")}`;
      if (now !== signature) {
        report = await api(`/v1/jobs/${jobId}/report`);
        if (stale(generation)) return;
        signature = now;
        renderReport();
        await refreshEvents();
      }
      renderHead();
      renderChildren();
      await refreshCurves();
      if (!ACTIVE.has(job.state)) {
        session.timers.forEach(clearInterval);
        session.timers = [];
      }
    } catch (err) {
      if (!stale(generation)) notify(err.status === 404 ? "No such job in your team." : err.message, true);
    }
  }
  renderHead();
  every(POLL_MS, refresh);
}
