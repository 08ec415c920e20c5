// Compare jobs side by side.
import { axisContext, chartControls, chartFigure, makeLineChart, seriesDatasets, setChartData } from "./charts.js";
import { ACTIVE, HIDDEN_SERIES, MAX_POINTS, PLOTS, POLL_MS, api, every, fmtNum, h, jobTitle, ldregOf, methodOf, notify, replaceIfChanged, session, stale, stateBadge } from "./core.js";

export function renderCompare(view, params) {
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
  let last = null;  // the latest jobs and metrics, redrawn when a chart setting changes
  view.append(summary, h("section", { "aria-labelledby": "cmp-curves-title" }, h("h2", { id: "cmp-curves-title" }, "Curves"),
    chartControls(() => last && drawCurves(...last)), grid));
  const figures = {};

  function drawCurves(jobs, metrics) {
    const names = [...PLOTS.flatMap((p) => p.series), ...new Set(metrics.flatMap((m) => Object.keys(m)))]
      .filter((n, i, all) => all.indexOf(n) === i && !HIDDEN_SERIES.has(n) && metrics.some((m) => m[n] && m[n].length));
    const contexts = jobs.map((j, i) => axisContext(j, metrics[i]));
    for (const name of names) {
      if (!figures[name]) {
        const figure = chartFigure(`cmp-${name.replace(/[^a-z0-9_-]/gi, "_")}`, name);
        grid.append(figure);
        figures[name] = { figure, chart: makeLineChart(figure, [], { yTitle: name }) };
      }
      const { figure, chart } = figures[name];
      setChartData(chart, figure, jobs.flatMap((j, i) => seriesDatasets(`${jobTitle(j)} (${methodOf(j)}, LDReg ${ldregOf(j)})`,
        metrics[i][name] || [], i, { dash: i, ctx: contexts[i] })));
    }
  }

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
    const metrics = await Promise.all(ids.map((id) => api(`/v1/jobs/${id}/metrics?max_points=${MAX_POINTS}`).then((m) => m.series)));
    if (stale(generation)) return;
    renderComparisonSummary(summary, jobs, metrics, comparison);
    last = [jobs, metrics];
    drawCurves(jobs, metrics);
    if (jobs.every((j) => !ACTIVE.has(j.state))) {
      session.timers.forEach(clearInterval);
      session.timers = [];
    }
  }
  every(POLL_MS * 2, refresh);
}

/* How a job's values stand: final once it has finished, else the latest so far. */
export function valuesLabel(job, compared) {
  const final = compared ? compared.metrics && compared.metrics.final : !ACTIVE.has(job.state);
  if (!final) return `latest (${job.state})`;
  return job.state === "succeeded" ? "final" : `final (${job.state})`;
}

export function renderComparisonSummary(section, jobs, metrics, comparison) {
  const last = (pts) => (pts && pts.length ? pts.reduce((a, b) => (b.step >= a.step ? b : a)).value : undefined);
  const names = PLOTS.flatMap((p) => p.series).filter((n) => metrics.some((m) => m[n] && m[n].length));
  const compared = Object.fromEntries(((comparison && comparison.jobs) || []).map((j) => [j.id, j]));
  // A job's value of a series: the compare endpoint's (a finished job's summary on top),
  // else its newest point.
  const valueOf = (j, i, n) => {
    const values = compared[j.id] && compared[j.id].metrics && compared[j.id].metrics.values;
    return values && values[n] !== undefined ? values[n] : last(metrics[i][n]);
  };
  const cell = (j, i, n) => {
    const running = ACTIVE.has(j.state);
    return h("span", { class: running ? "latest" : null, title: running ? "the latest value of a running job" : null }, fmtNum(valueOf(j, i, n)));
  };
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
    ["values", jobs.map((j) => h("span", { "data-values": ACTIVE.has(j.state) ? "latest" : "final" }, valuesLabel(j, compared[j.id])))],
    ...names.map((n) => [n, jobs.map((j, i) => cell(j, i, n))]),
    ...lidRows,
  ];
  const table = h("table", { id: "compare-table" },
    h("caption", {}, comparison ? "The first job is the baseline." : ""),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, ""), jobs.map((j) => h("th", { scope: "col" }, h("a", { href: `#/jobs/${j.id}` }, jobTitle(j)))))),
    h("tbody", {}, rows.map(([label, values]) => h("tr", {}, h("th", { scope: "row" }, label), values.map((v) => h("td", {}, v))))));
  // What differs between the jobs' specs first, then how their results differ.
  const parts = [h("h2", { id: "cmp-sum-title" }, "Summary")];
  if (comparison && Array.isArray(comparison.spec_diff)) parts.push(...specDiff(jobs, comparison.spec_diff));
  parts.push(h("h3", {}, "Results"), table);
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

/* Only the spec fields that differ between the jobs (GET /v1/compare's spec_diff). */
export function specDiff(jobs, differences) {
  const title = h("h3", { id: "cmp-spec-title" }, "Spec differences");
  if (!differences.length) return [title, h("p", { id: "compare-spec-diff", class: "empty" }, "The specs are the same.")];
  const fmt = (v) => (v === null || v === undefined ? "–" : typeof v === "object" ? JSON.stringify(v) : String(v));
  return [title, h("table", { id: "compare-spec-diff", "aria-labelledby": "cmp-spec-title" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "field"), jobs.map((j) => h("th", { scope: "col" }, jobTitle(j))))),
    h("tbody", {}, differences.map((d) => h("tr", { "data-field": d.field },
      h("th", { scope: "row", class: "mono" }, d.field),
      d.values.map((v, i) => h("td", { class: i > 0 && JSON.stringify(v) !== JSON.stringify(d.values[0]) ? "mono changed" : "mono" }, fmt(v)))))))];
}
