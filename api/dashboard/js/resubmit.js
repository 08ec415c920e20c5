// "Resubmit with changes": a job's spec in an editor, checked by the server as you type
// (POST /v1/jobs?dry_run=true: the same checks as a submit, nothing created), then
// submitted as a new job.
import { api, h, jobTitle, session, stale } from "./core.js";

const CHECK_DELAY_MS = 350;

export function renderResubmit(view, jobId) {
  document.title = "Resubmit · LDReg";
  const generation = session.generation;
  const back = h("a", { href: `#/jobs/${encodeURIComponent(jobId)}` }, "← Back to the job");
  const origin = h("p", { class: "hint", id: "resubmit-origin" }, "Loading the job…");
  const nameInput = h("input", { id: "resubmit-name", name: "name", type: "text", autocomplete: "off", "aria-describedby": "resubmit-name-error" });
  const nameError = h("div", { class: "field-error", id: "resubmit-name-error" });
  const editor = h("textarea", { id: "resubmit-spec", name: "spec", rows: "24", spellcheck: "false", autocomplete: "off",
    class: "mono spec-editor", "aria-describedby": "resubmit-status resubmit-errors" });
  const status = h("p", { id: "resubmit-status", role: "status", "aria-live": "polite", class: "hint" }, "");
  const errors = h("ul", { id: "resubmit-errors", class: "field-errors", "aria-live": "polite" });
  const changes = h("div", { id: "resubmit-changes", class: "hint" });
  const submit = h("button", { type: "submit", id: "resubmit-submit", disabled: true }, "Submit the new job");
  const form = h("form", { id: "resubmit-form", novalidate: true },
    h("h1", {}, "Resubmit with changes"), origin,
    h("label", { for: "resubmit-name" }, "Name", nameInput), nameError,
    h("label", { for: "resubmit-spec" }, "Spec (JSON), checked by the server as you type", editor),
    status, errors, changes,
    h("div", { class: "actions" }, submit, back));
  view.append(form);

  let job = null;
  let original = null;
  let timer = null;
  let checked = 0;  // the sequence number of the latest check sent
  let valid = false;

  function body() {
    const name = nameInput.value.trim();
    return { kind: job.kind, ...(name ? { name } : {}), spec: JSON.parse(editor.value) };
  }

  function show(problems, message) {
    errors.replaceChildren(...problems.map((p) => h("li", { "data-field": p.field },
      p.line ? h("span", { class: "mono" }, `line ${p.line}: `) : null,
      h("strong", {}, p.field), `: ${p.message}`)));
    const specProblems = problems.filter((p) => p.field !== "name");
    if (specProblems.length) editor.setAttribute("aria-invalid", "true");
    else editor.removeAttribute("aria-invalid");
    const nameProblem = problems.find((p) => p.field === "name");
    nameError.textContent = nameProblem ? nameProblem.message : "";
    if (nameProblem) nameInput.setAttribute("aria-invalid", "true");
    else nameInput.removeAttribute("aria-invalid");
    status.textContent = message;
    status.dataset.state = problems.length ? "invalid" : "valid";
  }

  async function check() {
    const seq = ++checked;
    valid = false;
    submit.disabled = true;
    let request;
    try {
      request = body();
    } catch (err) {
      show([{ field: "json", message: err.message }], "Not valid JSON yet.");
      return;
    }
    changes.replaceChildren(...describeChanges(original, request.spec));
    status.textContent = "Checking…";
    status.dataset.state = "checking";
    try {
      const answer = await api("/v1/jobs?dry_run=true", { method: "POST", json: request });
      if (seq !== checked || stale(generation)) return;
      valid = true;
      submit.disabled = false;
      show([], "Valid: the server accepts this spec.");
      editor.dataset.normalised = JSON.stringify(answer.spec);
    } catch (err) {
      if (seq !== checked || stale(generation)) return;
      if (err.status !== 422) {
        show([{ field: err.field || "request", message: err.message }], `The server could not check it (${err.status || "no answer"}).`);
        return;
      }
      const details = err.details && err.details.length ? err.details : [{ field: err.field || "spec", message: err.message }];
      const lines = keyLines(editor.value);
      show(details.map((d) => ({ ...d, line: lines.get(String(d.field || "").replace(/^spec\.?/, "")) })),
        `${details.length} problem${details.length > 1 ? "s" : ""}: fix ${details.length > 1 ? "them" : "it"} to submit.`);
    }
  }

  function schedule() {
    clearTimeout(timer);
    valid = false;
    submit.disabled = true;
    timer = setTimeout(check, CHECK_DELAY_MS);
  }
  editor.addEventListener("input", schedule);
  nameInput.addEventListener("input", schedule);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!valid) return;
    submit.disabled = true;
    try {
      const created = await api("/v1/jobs", { method: "POST", json: body() });
      session.flash = `Submitted job ${created.id}, a changed copy of ${jobTitle(job)}.`;
      location.hash = `#/jobs/${created.id}`;
    } catch (err) {
      submit.disabled = false;
      show([{ field: err.field || "request", message: err.message }], `Not submitted: ${err.message}`);
    }
  });

  api(`/v1/jobs/${encodeURIComponent(jobId)}`).then((found) => {
    if (stale(generation)) return;
    job = found;
    original = found.spec;
    origin.replaceChildren("A copy of ", h("a", { href: `#/jobs/${found.id}` }, jobTitle(found)),
      ` (${found.kind}, ${found.state}). Edit it; the original job is not changed.`);
    nameInput.value = found.name ? `${found.name} (changed)` : "";
    editor.value = JSON.stringify(found.spec, null, 2);
    check();
  }).catch((err) => {
    if (!stale(generation)) origin.textContent = err.status === 404 ? "No such job in your team." : err.message;
  });
}

/* The fields that differ from the original spec, as "field: old → new". */
export function describeChanges(before, after) {
  const diffs = [];
  const walk = (a, b, path) => {
    const isObj = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
    if (isObj(a) && isObj(b)) {
      for (const key of new Set([...Object.keys(a), ...Object.keys(b)])) walk(a[key], b[key], path ? `${path}.${key}` : key);
    } else if (JSON.stringify(a) !== JSON.stringify(b)) {
      diffs.push([path, a, b]);
    }
  };
  walk(before || {}, after || {}, "");
  if (!diffs.length) return [h("p", {}, "No changes yet: the new job would run the same spec.")];
  const fmt = (v) => (v === undefined ? "(default)" : JSON.stringify(v));
  return [h("p", {}, `Changed from the original (${diffs.length}):`),
    h("ul", { id: "resubmit-diff" }, diffs.map(([path, a, b]) => h("li", { class: "mono" }, `${path}: ${fmt(a)} → ${fmt(b)}`)))];
}

/* The line of each key of a JSON text, by its dotted path ("ldreg.k", "eval.lid_k.1"),
 * so a server error about a field can point at the line. Tolerates text that does not
 * parse (the paths up to the error). */
export function keyLines(text) {
  const lines = new Map();
  const stack = [];  // {type: "object" | "array", key, index}
  let line = 1;
  let lastString = null;  // a string just read, which a ":" makes a key
  const path = () => stack.map((f) => (f.type === "array" ? String(f.index) : f.key)).join(".");
  for (let i = 0; i < text.length; i += 1) {
    const c = text[i];
    if (c === "\n") { line += 1; continue; }
    if (/\s/.test(c)) continue;
    const top = stack[stack.length - 1];
    // An array's element starts here: note its line.
    if (top && top.type === "array" && c !== "," && c !== "]" && !lines.has(path())) lines.set(path(), line);
    if (c === '"') {
      let j = i + 1;
      let value = "";
      const at = line;
      while (j < text.length && text[j] !== '"') {
        if (text[j] === "\\") { value += text[j + 1] || ""; j += 2; continue; }
        if (text[j] === "\n") line += 1;
        value += text[j];
        j += 1;
      }
      lastString = { value, line: at };
      i = j;
      continue;
    }
    if (c === ":" && top && top.type === "object" && lastString) {
      top.key = lastString.value;
      lines.set(path(), lastString.line);
    } else if (c === "{" || c === "[") {
      stack.push({ type: c === "{" ? "object" : "array", key: null, index: 0 });
    } else if (c === "}" || c === "]") {
      stack.pop();
    } else if (c === "," && top) {
      if (top.type === "array") top.index += 1;
      else top.key = null;
    }
    lastString = null;
  }
  return lines;
}
