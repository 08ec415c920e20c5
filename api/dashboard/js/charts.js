// Line charts (Chart.js, loaded as a classic script: the global `Chart`).
import { COLORS, DASHES, fmtNum, h, session } from "./core.js";

// What the x axis measures; every chart of a page follows one choice (chartControls).
export const X_AXES = {
  step: "step",
  epoch: "epoch",
  time: "training time (s)",
};

// The page's chart settings, kept while the tab lives.
const SETTINGS_KEY = "ldreg.charts";
export const chartSettings = Object.assign(
  { x: "step", log: false, smoothing: 0.6 },
  JSON.parse(sessionStorage.getItem(SETTINGS_KEY) || "{}"),
);

/* The toolbar above a page's charts: x axis, log scale, smoothing. `onChange` redraws. */
export function chartControls(onChange) {
  const save = () => {
    sessionStorage.setItem(SETTINGS_KEY, JSON.stringify(chartSettings));
    onChange();
  };
  const xSelect = h("select", { id: "chart-x" },
    Object.entries(X_AXES).map(([value, label]) => h("option", { value, selected: value === chartSettings.x }, label)));
  xSelect.addEventListener("change", () => { chartSettings.x = xSelect.value; save(); });
  const log = h("input", { type: "checkbox", id: "chart-log", checked: chartSettings.log });
  log.addEventListener("change", () => { chartSettings.log = log.checked; save(); });
  const slider = h("input", { type: "range", id: "chart-smoothing", min: "0", max: "0.99", step: "0.01",
    value: String(chartSettings.smoothing), "aria-describedby": "chart-smoothing-value" });
  const shown = h("output", { id: "chart-smoothing-value", for: "chart-smoothing" }, chartSettings.smoothing.toFixed(2));
  slider.addEventListener("input", () => {
    chartSettings.smoothing = Number(slider.value);
    shown.textContent = chartSettings.smoothing.toFixed(2);
    save();
  });
  return h("div", { class: "chart-controls row", role: "group", "aria-label": "Chart settings" },
    h("label", { for: "chart-x" }, "x axis", xSelect),
    h("label", { class: "inline", for: "chart-log" }, log, "log scale (y)"),
    h("label", { for: "chart-smoothing" }, "smoothing (EMA, per-step series)",
      h("span", { class: "inline-pair" }, slider, shown)));
}

/* How a job's points map onto the time and epoch axes: its steps per epoch and the
 * durations of its epochs (the epoch_seconds series; the mean for those not known). */
export function axisContext(job, series) {
  const durations = [...(series.epoch_seconds || [])].sort((a, b) => a.epoch - b.epoch);
  const progress = (job && job.progress) || {};
  let perEpoch = progress.steps && progress.epochs ? progress.steps / progress.epochs : null;
  // An epoch's rows sit at the step that ends it (epoch × steps per epoch).
  for (const p of durations) if (!perEpoch && p.epoch > 0 && p.step > 0) perEpoch = p.step / p.epoch;
  const known = new Map(durations.map((p) => [p.epoch, p.value]));
  const mean = durations.length ? durations.reduce((a, p) => a + p.value, 0) / durations.length : null;
  let latestStep = progress.step || 0;
  for (const points of Object.values(series)) if (points.length) latestStep = Math.max(latestStep, points[points.length - 1].step);
  const started = job && job.started_at ? new Date(job.started_at).getTime() : null;
  const ends = [0];  // ends[e]: seconds of training when epoch e ended
  return {
    perEpoch,
    epochEnd(e) {
      while (ends.length <= e) ends.push(ends[ends.length - 1] + (known.get(ends.length) ?? mean ?? 0));
      return ends[e];
    },
    // Before any epoch has ended: the time since the start, spread evenly over the steps.
    secondsPerStep: mean === null && started && latestStep ? (Date.now() - started) / 1000 / latestStep : null,
    hasTime: mean !== null && Boolean(perEpoch),
  };
}

/* Points of one series as {x, y} on the chosen axis. */
export function toPoints(points, axis, ctx) {
  if (axis === "step") return points.map((p) => ({ x: p.step, y: p.value }));
  if (axis === "epoch") {
    if (!ctx || !ctx.perEpoch) return toXY(points);
    return points.map((p) => ({ x: p.step / ctx.perEpoch, y: p.value }));
  }
  // Training time: the epoch's start plus the share of the epoch the step is into.
  if (ctx && ctx.hasTime) {
    return points.map((p) => {
      const into = Math.min(Math.max(p.step / ctx.perEpoch - (p.epoch - 1), 0), 1);
      const start = ctx.epochEnd(p.epoch - 1);
      return { x: start + into * (ctx.epochEnd(p.epoch) - start), y: p.value };
    });
  }
  if (ctx && ctx.secondsPerStep) return points.map((p) => ({ x: p.step * ctx.secondsPerStep, y: p.value }));
  return [];
}

/* Points of one series as {x, y}: x is the epoch, with several points of one epoch
 * spread evenly inside it (when the steps per epoch are not known). */
export function toXY(points) {
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

/* TensorBoard's smoothing: an exponential moving average, debiased so that the first
 * points are not pulled towards zero. Each point keeps its raw value. */
export function smooth(data, weight) {
  if (!weight) return data;
  let last = 0;
  let n = 0;
  return data.map((p) => {
    if (!Number.isFinite(p.y)) return { ...p, raw: p.y };
    last = last * weight + (1 - weight) * p.y;
    n += 1;
    return { x: p.x, y: last / (1 - weight ** n), raw: p.y };
  });
}

/* A series has per-step points when some epoch holds more than one of them. */
export function perStep(points) {
  const epochs = new Set(points.map((p) => p.epoch));
  return points.length > epochs.size;
}

/* The datasets of one series: the smoothed line, with the raw one faint behind it,
 * when smoothing is on and the series has per-step points; else the points as they are. */
export function seriesDatasets(label, points, index, { dash = 0, yAxisID = "y", ctx = null } = {}) {
  const data = toPoints(points, chartSettings.x, ctx);
  const base = dataset(label, data, index, dash);
  base.yAxisID = yAxisID;
  if (!chartSettings.smoothing || !perStep(points) || data.length < 3) return [base];
  const color = COLORS[index % COLORS.length];
  const raw = { ...base, label: `${label} (raw)`, isRaw: true, borderColor: `${color}40`, backgroundColor: `${color}40`,
    borderWidth: 1, pointRadius: 0 };
  return [raw, { ...base, data: smooth(data, chartSettings.smoothing), pointRadius: 0 }];
}

export function makeLineChart(figure, datasets, { yTitle = "", y2Title = "" } = {}) {
  const canvas = figure.querySelector("canvas");
  const chart = new Chart(canvas, {
    type: "line",
    data: { datasets },
    options: {
      animation: false,
      maintainAspectRatio: false,
      parsing: true,
      normalized: true,
      interaction: { mode: "nearest", axis: "x", intersect: false },
      scales: {
        x: { type: "linear", title: { display: true, text: X_AXES[chartSettings.x] } },
        y: { type: chartSettings.log ? "logarithmic" : "linear", title: { display: Boolean(yTitle), text: yTitle } },
        // A second axis for a term on another scale (the LDReg term next to the SSL loss).
        y2: { position: "right", display: "auto", grid: { drawOnChartArea: false },
          title: { display: Boolean(y2Title), text: y2Title } },
      },
      plugins: {
        legend: { position: "bottom", labels: { boxWidth: 18, filter: (item, data) => !data.datasets[item.datasetIndex].isRaw } },
        tooltip: {
          filter: (item) => !item.dataset.isRaw,
          callbacks: {
            title: (items) => (items.length ? `${X_AXES[chartSettings.x]} ${fmtNum(items[0].parsed.x)}` : ""),
            label: (item) => {
              const raw = item.raw && item.raw.raw;
              const extra = raw !== undefined && raw !== item.parsed.y ? ` (raw ${fmtNum(raw)})` : "";
              return `${item.dataset.label}: ${fmtNum(item.parsed.y)}${extra}`;
            },
          },
        },
      },
      elements: { point: { radius: 2.5 }, line: { borderWidth: 2 } },
    },
  });
  session.charts.push(chart);
  return chart;
}

export function chartFigure(id, title) {
  return h("figure", { class: "chart", id: `chart-${id}`, "data-points": "0" },
    h("figcaption", { id: `chart-${id}-title` }, title),
    h("div", { class: "chart-box" },
      h("canvas", { role: "img", "aria-labelledby": `chart-${id}-title`, "aria-describedby": `chart-${id}-desc` }),
      h("p", { class: "chart-empty", "aria-hidden": "true" }, "no data yet")),
    h("p", { class: "sr-only", id: `chart-${id}-desc`, "aria-live": "off" }, "no data yet"));
}

/* Replace a chart's datasets, apply the page's axis settings, and publish its point
 * count (data-points, read by the browser test; raw copies behind smoothed lines do not
 * count) and a text summary for screen readers. */
export function setChartData(chart, figure, datasets) {
  chart.data.datasets = datasets;
  const { scales } = chart.options;
  scales.x.title.text = X_AXES[chartSettings.x];
  scales.y.type = chartSettings.log ? "logarithmic" : "linear";
  chart.update("none");
  const shown = datasets.filter((d) => !d.isRaw);
  const count = shown.reduce((n, d) => n + d.data.length, 0);
  figure.dataset.points = String(count);
  figure.dataset.x = chartSettings.x;
  figure.querySelector(".chart-empty").hidden = count > 0;
  const last = shown.filter((d) => d.data.length)
    .map((d) => `${d.label}: ${fmtNum(d.data[d.data.length - 1].y)} at ${X_AXES[chartSettings.x]} ${fmtNum(d.data[d.data.length - 1].x)}`);
  figure.querySelector(".sr-only").textContent = last.length ? `Latest values. ${last.join("; ")}.` : "no data yet";
}

export function dataset(label, data, index, dashIndex = 0) {
  const color = COLORS[index % COLORS.length];
  return { label, data, borderColor: color, backgroundColor: color, borderDash: DASHES[dashIndex % DASHES.length], pointRadius: data.length > 60 ? 0 : 2.5 };
}
