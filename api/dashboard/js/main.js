/* LDReg dashboard: a single page over HTTP API v1 (no build step, no framework).
 *
 * Views (hash routes): #/jobs, #/jobs/<id>, #/jobs/<id>/resubmit, #/compare?jobs=a,b,
 * #/submit; the sign-in form (without the navigation bar) whenever no key is held. The team API key lives in sessionStorage only: it is
 * gone when the tab closes and never written to disk by us or sent anywhere but this
 * origin's API. Every piece of server data reaches the page through textContent (the
 * `h` helper), never innerHTML.
 */
// The router: renders the view of the location's hash; the sign-in form.
import { renderCompare } from "./compare.js";
import { KEY_STORAGE, api, h, notify, parseHash, session } from "./core.js";
import { renderJobOrSweep } from "./sweep.js";
import { renderJobs } from "./jobs.js";
import { renderResubmit } from "./resubmit.js";
import { renderSubmit } from "./submit.js";

// ---------------------------------------------------------------------------------------
// Views

export function render() {
  session.generation += 1;
  session.timers.forEach(clearInterval);
  session.timers = [];
  session.charts.forEach((c) => c.destroy());
  session.charts = [];
  // A message for the view being opened (set before navigating to it), else none.
  notify(session.flash || "");
  session.flash = null;
  const view = document.getElementById("view");
  view.replaceChildren();
  const nav = document.getElementById("nav");
  nav.hidden = !session.key;
  if (!session.key) return renderSignIn(view);
  const { parts, params } = parseHash();
  for (const a of nav.querySelectorAll("a[data-nav]")) {
    if (a.dataset.nav === parts[0]) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (parts[0] === "jobs" && parts[1] && parts[2] === "resubmit") return renderResubmit(view, decodeURIComponent(parts[1]));
  // A sweep's page is its own (sweep.js); any other job's is job.js's.
  if (parts[0] === "jobs" && parts[1]) return renderJobOrSweep(view, decodeURIComponent(parts[1]));
  if (parts[0] === "compare") return renderCompare(view, params);
  if (parts[0] === "submit") return renderSubmit(view);
  return renderJobs(view, params);
}

export function signOut(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  session.key = null;
  render();
  if (message) notify(message, true);
}

export function renderSignIn(view) {
  document.title = "Sign in · LDReg";
  const input = h("input", { id: "api-key", name: "api-key", type: "password", autocomplete: "off", required: true, spellcheck: "false", "aria-describedby": "api-key-hint" });
  const error = h("p", { class: "field-error", id: "signin-error", role: "alert" });
  const form = h("form", { class: "panel signin", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Sign in"),
    h("label", { for: "api-key" }, "Team API key", input),
    h("p", { class: "hint", id: "api-key-hint" },
      "Paste your team's key (ldreg admin create-team prints one). It is kept in this browser tab only and forgotten when you close it."),
    error,
    h("button", { type: "submit", id: "sign-in" }, "Sign in"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    session.key = key;
    try {
      await api("/v1/jobs?limit=1", { signOutOn401: false });
    } catch (err) {
      session.key = null;
      error.textContent = err.status === 401 ? "That key was not accepted." : err.message;
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    if (!location.hash || location.hash === "#/" ) location.hash = "#/jobs";
    render();
  });
  view.append(form);
  input.focus();
}

// Job list ------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------

document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
window.addEventListener("hashchange", render);
render();
