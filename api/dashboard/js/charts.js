// Line charts (Chart.js, loaded as a classic script: the global `Chart`).
import { COLORS, DASHES, fmtNum, h, session } from "./core.js";

/* Points of one series as {x, y}: x is the epoch, with several points of one epoch
 * spread evenly inside it (a per-step series plots on the same axis as per-epoch ones). */
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

export function makeLineChart(figure, datasets, { xTitle = "epoch", yTitle = "" } = {}) {
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

export function chartFigure(id, title) {
  return h("figure", { class: "chart", id: `chart-${id}`, "data-points": "0" },
    h("figcaption", { id: `chart-${id}-title` }, title),
    h("div", { class: "chart-box" },
      h("canvas", { role: "img", "aria-labelledby": `chart-${id}-title`, "aria-describedby": `chart-${id}-desc` })),
    h("p", { class: "sr-only", id: `chart-${id}-desc`, "aria-live": "off" }, "no data yet"));
}

/* Replace a chart's datasets and publish its point count (data-points, read by the
 * browser test) and a text summary for screen readers. */
export function setChartData(chart, figure, datasets) {
  chart.data.datasets = datasets;
  chart.update("none");
  const count = datasets.reduce((n, d) => n + d.data.length, 0);
  figure.dataset.points = String(count);
  const last = datasets.filter((d) => d.data.length)
    .map((d) => `${d.label}: ${fmtNum(d.data[d.data.length - 1].y)} at epoch ${fmtNum(d.data[d.data.length - 1].x)}`);
  figure.querySelector(".sr-only").textContent = last.length ? `Latest values. ${last.join("; ")}.` : "no data yet";
}

export function dataset(label, data, index, dashIndex = 0) {
  const color = COLORS[index % COLORS.length];
  return { label, data, borderColor: color, backgroundColor: color, borderDash: DASHES[dashIndex % DASHES.length], pointRadius: data.length > 60 ? 0 : 2.5 };
}
