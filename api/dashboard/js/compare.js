// Compare jobs side by side.
import { chartFigure, dataset, makeLineChart, setChartData, toXY } from "./charts.js";
import { ACTIVE, HIDDEN_SERIES, PLOTS, POLL_MS, api, every, fmtNum, h, jobTitle, ldregOf, methodOf, notify, replaceIfChanged, session, stale, stateBadge } from "./core.js";

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

export function renderComparisonSummary(section, jobs, metrics, comparison) {
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
