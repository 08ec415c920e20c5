// One job: state, live charts, events, artifacts, diagnosis.
import { chartFigure, dataset, makeLineChart, setChartData, toXY } from "./charts.js";
import { ACTIVE, COLORS, HIDDEN_SERIES, PLOTS, PLOTTED, POLL_MS, api, every, fmtBytes, fmtNum, fmtTime, h, jobTitle, ldregOf, methodOf, notify, progressCell, replaceIfChanged, session, stale, stateBadge } from "./core.js";

export function renderJob(view, jobId) {
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
