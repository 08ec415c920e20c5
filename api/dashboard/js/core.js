// Shared state, DOM helpers, the API call, formatters and timers.
import { signOut } from "./main.js";

export const KEY_STORAGE = "ldreg.apiKey";
export const POLL_MS = 2000;
export const STATES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"];
export const ACTIVE = new Set(["queued", "running", "cancelling"]);
export const KINDS = ["pretrain", "diagnose", "sweep"];
// Metric names of docs/science.md; each group is one plot.
// The loss terms, lr and ldreg_lid_gmean have a point per training step besides each
// epoch's value (docs/api.md, "Metrics"); the evaluations have one per evaluated epoch.
export const PLOTS = [
  { id: "loss", title: "Loss terms (ldreg_loss on the right axis)", series: ["loss", "ssl_loss", "ldreg_loss"], rightAxis: ["ldreg_loss"], yTitle: "loss, ssl_loss", y2Title: "ldreg_loss" },
  // lid_gmean_k{k} is named by the k used (k = N - 1 on a small held-out set): any k.
  { id: "lid", title: "Geometric-mean LID: held-out MLE (lid_gmean_k{k}, named by the k used) and the LDReg term's own estimate on training batches (ldreg_lid_gmean)", series: ["lid_gmean_k32", "lid_gmean_k512", "ldreg_lid_gmean"], pattern: /^lid_gmean_k\d+$/, yTitle: "LID (geometric mean)" },
  { id: "rank", title: "Effective rank", series: ["effective_rank"], yTitle: "effective rank" },
  { id: "acc", title: "Held-out accuracy: kNN and online probe at every evaluation, offline linear probe (L2 chosen) at the end", series: ["knn_acc", "online_probe_acc", "linear_probe_acc"], yTitle: "accuracy" },
  { id: "lr", title: "Learning rate", series: ["lr"], yTitle: "lr" },
];
// At most this many points per series in one metrics read (every epoch's value is kept
// on top); a page that has gathered twice as many reads them thinned again.
export const MAX_POINTS = 1500;
export const LOG_POLL_MS = 1000;
export const PLOTTED = new Set(PLOTS.flatMap((p) => p.series));
/* The series one plot draws: its named ones, then those its pattern matches. */
export function plotSeries(plot, series) {
  const extra = plot.pattern ? Object.keys(series).filter((n) => plot.pattern.test(n) && !plot.series.includes(n)).sort() : [];
  return [...plot.series, ...extra].filter((n) => series[n]);
}
export const isPlotted = (name) => PLOTTED.has(name) || PLOTS.some((p) => p.pattern && p.pattern.test(name));
export const HIDDEN_SERIES = new Set(["epoch_seconds"]);
// Okabe–Ito palette: distinguishable with colour-blindness, dark enough on white.
export const COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#8C564B"];
export const DASHES = [[], [6, 3], [2, 2], [8, 3, 2, 3]];

export const session = { key: sessionStorage.getItem(KEY_STORAGE), timers: [], charts: [], generation: 0 };

// ---------------------------------------------------------------------------------------
// Helpers

export function h(tag, attrs = {}, ...children) {
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
export function replaceIfChanged(el, ...children) {
  const next = h("div", {}, ...children);
  if (next.innerHTML !== el.innerHTML) el.replaceChildren(...next.childNodes);
}

// Make `nodes` the children of `parent`, in order, moving only what has to move.
export function placeChildren(parent, nodes) {
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

export async function api(path, { method = "GET", json, raw = false, signOutOn401 = true } = {}) {
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

export function notify(message, isError = false) {
  const el = document.getElementById("notice");
  el.textContent = message || "";
  el.classList.toggle("error", Boolean(isError && message));
}

export function fmtTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

export function fmtNum(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  if (!Number.isFinite(v)) return String(v);
  if (Number.isInteger(v)) return String(v);
  return Math.abs(v) >= 1000 || Math.abs(v) < 0.001 ? v.toExponential(3) : v.toPrecision(4);
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "";
  seconds = Math.max(0, Math.round(seconds));
  const hh = Math.floor(seconds / 3600), mm = Math.floor((seconds % 3600) / 60), ss = seconds % 60;
  return hh ? `${hh}h ${String(mm).padStart(2, "0")}m` : `${mm}m ${String(ss).padStart(2, "0")}s`;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function jobTitle(job) {
  return job.name || job.id.slice(0, 12);
}

export function methodOf(job) {
  return job.kind === "pretrain" ? job.spec.method || "–" : "–";
}

export function ldregOf(job) {
  if (job.kind !== "pretrain") return "–";
  const ldreg = job.spec.ldreg;
  if (ldreg === null) return "off";
  return ldreg && ldreg.alpha !== undefined && ldreg.alpha !== null ? `on (α=${ldreg.alpha})` : "on";
}

export function stateBadge(state) {
  return h("span", { class: `state state-${state}`, "data-state": state }, state);
}

/* ETA = remaining epochs × mean past epoch duration: the `epoch_seconds` series when the
 * worker reports it, else the time since the job started divided by finished epochs. */
export function etaSeconds(job, epochSeconds) {
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

export function progressCell(job, epochSeconds) {
  const { epoch = 0, epochs = 0 } = job.progress || {};
  if (!epochs) return h("span", { class: "eta" }, job.state === "running" ? "running" : "–");
  const eta = etaSeconds(job, epochSeconds);
  return h("div", { class: "progress" },
    h("progress", { max: epochs, value: epoch, "aria-label": job.kind === "sweep" ? `${epoch} of ${epochs} children finished` : `epoch ${epoch} of ${epochs}` }),
    h("span", { class: "mono" }, `${epoch}/${epochs}`),
    eta !== null ? h("span", { class: "eta" }, `ETA ${fmtDuration(eta)}`) : null);
}

export function every(ms, fn) {
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

export function stale(generation) {
  return generation !== session.generation;
}

export function parseHash() {
  const hash = location.hash.replace(/^#/, "") || "/jobs";
  const [path, query = ""] = hash.split("?");
  return { parts: path.split("/").filter(Boolean), params: new URLSearchParams(query) };
}

// ---------------------------------------------------------------------------------------
// Charts (Chart.js, vendored)
