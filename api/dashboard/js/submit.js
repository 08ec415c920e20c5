// The submit form; its choices come from the API's schema.
import { api, h, notify } from "./core.js";

// Submit --------------------------------------------------------------------------------

export const SUBMIT_FIELDS = [
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
export let schemasPromise = null;

export function specSchemas() {
  schemasPromise ??= fetch("/openapi.json").then((r) => {
    if (!r.ok) throw new Error(`openapi.json: HTTP ${r.status}`);
    return r.json();
  }).then((doc) => doc.components.schemas);
  return schemasPromise;
}

export async function fillChoices(form) {
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

export function fieldId(path) {
  return `f-${path.replace(/\./g, "-")}`;
}

export function renderSubmit(view) {
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

export function setPath(obj, path, value) {
  const parts = path.split(".");
  let cur = obj;
  for (const p of parts.slice(0, -1)) cur = cur[p] = cur[p] || {};
  cur[parts[parts.length - 1]] = value;
}

export function clearErrors(form, formErrors) {
  formErrors.replaceChildren();
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
}

/* Put each of the server's field errors next to its field: the field named exactly, or
 * the nearest enclosing one ("spec.eval.lid_k.1" → spec.eval.lid_k); errors about the
 * spec as a whole go above the form. */
export function showErrors(form, formErrors, err) {
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
