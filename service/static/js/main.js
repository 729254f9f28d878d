// The dashboard's shell: the API key dialog, the error banner, and hash routes to the views
// (#/jobs, #/jobs/<id>, #/compare/<id>,<id>, #/datasets, #/models, #/models/<name>,
// #/galleries, #/galleries/<id>, #/checks/<id>).

import { ApiError, apiKey, getJSON, onUnauthorized } from "./api.js";
import { h, setChildren } from "./dom.js";
import { describeError, setMessage } from "./messages.js";
import { renderCheck } from "./views/check.js";
import { renderCompare } from "./views/compare.js";
import { renderDatasets } from "./views/datasets.js";
import { renderGalleries, renderGallery } from "./views/galleries.js";
import { renderJob } from "./views/job.js";
import { renderJobs } from "./views/jobs.js";
import { renderModels } from "./views/models.js";

const ROUTES = [
  { pattern: /^#\/jobs\/?$/, section: "jobs", render: renderJobs },
  { pattern: /^#\/jobs\/([^/]+)$/, section: "jobs", render: renderJob },
  { pattern: /^#\/compare\/([^/]+)$/, section: "jobs", render: renderCompare },
  { pattern: /^#\/datasets\/?$/, section: "datasets", render: renderDatasets },
  { pattern: /^#\/models(?:\/([^/]+))?\/?$/, section: "models", render: renderModels },
  { pattern: /^#\/galleries\/?$/, section: "galleries", render: renderGalleries },
  { pattern: /^#\/galleries\/([^/]+)$/, section: "galleries", render: renderGallery },
  { pattern: /^#\/checks\/([^/]+)$/, section: "galleries", render: renderCheck },
];

const view = document.getElementById("view");
const banner = document.getElementById("banner");
const keyDialog = document.getElementById("key-dialog");
const keyForm = document.getElementById("key-form");
const keyError = document.getElementById("key-error");

/** Shows an error no view handled above the view, until dismissed or the route changes. */
function showBanner(error) {
  document.getElementById("banner-text").textContent = describeError(error);
  banner.hidden = false;
}

function hideBanner() {
  banner.hidden = true;
}

let cleanup = null;

function route() {
  if (cleanup) cleanup();
  cleanup = null;
  hideBanner();
  const hash = window.location.hash || "#/jobs";
  const match = ROUTES.map((r) => ({ r, m: r.pattern.exec(hash) })).find(({ m }) => m !== null);
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle(
      "active",
      match !== undefined && link.dataset.section === match.r.section,
    );
  }
  if (match === undefined) {
    setChildren(
      view,
      h("h1", {}, "Not found"),
      h(
        "p",
        {},
        "No page at ",
        h("code", {}, hash),
        ". ",
        h("a", { href: "#/jobs" }, "Go to the jobs."),
      ),
    );
    return;
  }
  if (!apiKey.get()) {
    setChildren(
      view,
      h("p", { class: "muted" }, "Enter an API key to see your jobs, datasets and models."),
    );
    askForKey();
    return;
  }
  const params = match.m.slice(1).map((p) => (p === undefined ? undefined : decodeURIComponent(p)));
  setChildren(view);
  cleanup = match.r.render(view, params) || null;
}

function updateKeyLabel() {
  const key = apiKey.get();
  document.getElementById("key-label").textContent = key ? `key ${key.slice(0, 13)}…` : "no key";
}

function askForKey(message = "") {
  setMessage(keyError, message);
  keyForm.elements.key.value = "";
  if (!keyDialog.open) keyDialog.showModal();
}

/** Checks the key with a real call before keeping it, so a wrong key is refused here. */
async function submitKey(event) {
  event.preventDefault();
  const key = keyForm.elements.key.value.trim();
  if (!key) return;
  apiKey.set(key);
  const button = keyForm.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    await getJSON("v1/jobs?limit=1");
  } catch (error) {
    if (error.status !== 401) apiKey.clear(); // a 401 already cleared it
    setMessage(keyError, `This key was not accepted: ${describeError(error)}`);
    return;
  } finally {
    button.disabled = false;
    updateKeyLabel();
  }
  keyDialog.close();
  route();
}

onUnauthorized((error) => {
  updateKeyLabel();
  if (cleanup) cleanup();
  cleanup = null;
  setChildren(
    view,
    h("p", { class: "muted" }, "Enter an API key to see your jobs, datasets and models."),
  );
  askForKey(error.code === "no_api_key" ? "" : `The API refused the key: ${error.message}`);
});

keyForm.addEventListener("submit", submitKey);
document.getElementById("change-key").addEventListener("click", () => askForKey());
document.getElementById("forget-key").addEventListener("click", () => {
  apiKey.clear();
  updateKeyLabel();
  askForKey();
});
document.getElementById("banner-close").addEventListener("click", hideBanner);
window.addEventListener("hashchange", route);

// Nothing fails silently: an error no view caught still reaches the banner.
window.addEventListener("unhandledrejection", (event) => {
  if (event.reason && event.reason.name === "AbortError") return;
  showBanner(
    event.reason instanceof Error ? event.reason : new ApiError(0, "error", String(event.reason)),
  );
});
window.addEventListener("error", (event) => showBanner(event.error || new Error(event.message)));

updateKeyLabel();
route();
