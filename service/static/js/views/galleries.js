// #/galleries and #/galleries/<id>: the key owner's galleries (a dataset's images indexed with a
// registered model version, built by a worker), building one, and searching one with a query
// image: the closest gallery images with their scores, cameras and identities.
//
// Polling: the list every POLL_MS while a gallery is QUEUED or BUILDING, a gallery's page while
// it is; again after a Retry (a FAILED gallery goes back to QUEUED and builds from scratch).
// Thumbnails are fetched with the key (an <img src> cannot send X-API-Key) and shown as object
// URLs, all revoked when the view goes away.

import { ApiError, getJSON, request, sendJSON } from "../api.js";
import { h, setChildren } from "../dom.js";
import * as fmt from "../format.js";
import {
  alertLine,
  formMessage,
  setMessage,
  showError,
  showLoadError,
  showThumbError,
  whileBusy,
} from "../messages.js";
import { poll } from "../poll.js";
import {
  crumbs,
  dataTable,
  definitionList,
  progressBar,
  stateBadge,
  timelineItems,
} from "../widgets.js";

const POLL_MS = 2000;
const MAX_PAGE = 200; // the API's largest limit
const MAX_K = 1000; // service/routers/galleries.py MAX_K
const THUMBNAIL_FETCHES = 6; // thumbnails fetched at once
const VERSION_PATTERN = "[A-Za-z0-9_\\-]{1,64}"; // service.schemas.VERSION_REF_PATTERN
const ACTIVE = new Set(["QUEUED", "BUILDING"]);

const isActive = (gallery) => ACTIVE.has(gallery.state);
const isRetryable = (gallery) => gallery.state === "FAILED";
const galleryPath = (id) => `v1/galleries/${encodeURIComponent(id)}`;
const galleryTitle = (gallery) => gallery.name || fmt.shortId(gallery.id);

/** The dataset's name when known, else its short id; "(deleted)" once it is gone. */
function datasetName(gallery, dataset) {
  if (dataset) return dataset.name;
  return gallery.dataset_id ? fmt.shortId(gallery.dataset_id) : "(deleted)";
}

/** "c1" for camera_id 0 (Market-1501 file names count from 1), "unknown" without one. */
export const cameraLabel = (cameraId) =>
  typeof cameraId === "number" ? `c${cameraId + 1}` : "unknown";

/** "40 / 120" images embedded, from a gallery's counts. */
function imagesDone(gallery) {
  const total = typeof gallery.image_count === "number" ? gallery.image_count : "?";
  return `${gallery.images_done} / ${total}`;
}

/** The gallery's progress bar and image counts (while it builds), else its indexed count. */
function buildProgress(gallery) {
  if (isActive(gallery)) {
    return h(
      "span",
      { class: "gallery-progress" },
      progressBar(gallery),
      h("span", { class: "progress-count muted" }, `${imagesDone(gallery)} images`),
    );
  }
  return gallery.state === "READY" ? `${gallery.images_done} images` : fmt.DASH;
}

/** Deletes after a confirmation; resolves true when deleted. Errors go to `message`. */
async function deleteGallery(gallery, button, message) {
  const building = isActive(gallery) ? " Its build is stopped." : "";
  if (!window.confirm(`Delete gallery ${galleryTitle(gallery)} and its index?${building}`)) {
    return false;
  }
  button.disabled = true;
  setMessage(message, "");
  try {
    await request(galleryPath(gallery.id), { method: "DELETE" });
    return true;
  } catch (error) {
    showError(message, error, `Could not delete ${galleryTitle(gallery)}: `);
    button.disabled = false;
    return false;
  }
}

/**
 * Sends a FAILED gallery to the workers again (it builds from scratch); resolves to the gallery,
 * QUEUED, or null when the API refused (a dataset deleted or not ready, a gallery that is no
 * longer FAILED). Errors go to `message`.
 */
async function retryGallery(gallery, button, message) {
  button.disabled = true;
  setMessage(message, "");
  try {
    return await sendJSON("POST", `${galleryPath(gallery.id)}/retry`);
  } catch (error) {
    showError(message, error, `Could not retry ${galleryTitle(gallery)}: `);
    button.disabled = false;
    return null;
  }
}

// ---------------------------------------------------------------------------------------------
// #/galleries
// ---------------------------------------------------------------------------------------------

const COLUMNS = [
  ["Gallery", ""],
  ["State", ""],
  ["Progress", ""],
  ["Model", ""],
  ["Dataset", "optional"],
  ["Indexed", "num optional"],
  ["Skipped", "num optional"],
  ["Created", "optional"],
  ["Reason", ""],
  ["", ""],
];

export function renderGalleries(root) {
  const datasets = new Map(); // dataset id -> dataset
  const count = h("span", { class: "muted", id: "galleries-count" }, "loading…");
  const status = alertLine("galleries-status");
  const list = h("div", { id: "galleries-list" });
  const form = newGalleryForm(() => load());
  let closed = false;
  let listPoll = null;

  setChildren(
    root,
    h("div", { class: "view-head" }, h("h1", {}, "Galleries"), count),
    form.element,
    status,
    list,
  );

  function row(gallery) {
    const del = h("button", { type: "button", class: "link-button danger" }, "delete");
    del.addEventListener("click", async () => {
      if (await deleteGallery(gallery, del, status)) load();
    });
    let retry = null;
    if (isRetryable(gallery)) {
      retry = h("button", { type: "button", class: "link-button" }, "retry");
      retry.addEventListener("click", async () => {
        // QUEUED again: the refresh polls until it is built (or fails again).
        if (await retryGallery(gallery, retry, status)) load();
      });
    }
    const dataset = gallery.dataset_id ? datasets.get(gallery.dataset_id) : null;
    return h(
      "tr",
      { dataset: { galleryId: gallery.id, state: gallery.state } },
      h(
        "td",
        { class: "cell-gallery" },
        h("a", { href: `#/galleries/${gallery.id}` }, galleryTitle(gallery)),
        h("span", { class: "sub muted mono" }, fmt.shortId(gallery.id)),
      ),
      h("td", { class: "cell-state" }, stateBadge(gallery)),
      h("td", { class: "cell-progress" }, buildProgress(gallery)),
      h(
        "td",
        { class: "cell-model" },
        h("a", { href: `#/models/${encodeURIComponent(gallery.model_name)}` }, gallery.model_name),
        ` v${gallery.model_version}`,
      ),
      h("td", { class: "cell-dataset optional" }, datasetName(gallery, dataset)),
      h("td", { class: "cell-indexed num optional" }, gallery.images_done),
      h("td", { class: "cell-skipped num optional" }, gallery.skipped_count),
      h("td", { class: "cell-created optional" }, fmt.dateTime(gallery.created_at)),
      h(
        "td",
        { class: `cell-reason${gallery.error ? " form-error" : " muted"}` },
        gallery.error || gallery.reason || "",
      ),
      h("td", { class: "cell-actions" }, retry, del),
    );
  }

  async function loadDatasets() {
    const page = await getJSON(`v1/datasets?limit=${MAX_PAGE}`);
    datasets.clear();
    for (const d of page.items) datasets.set(d.id, d);
    form.setDatasets(page.items);
  }

  async function refresh() {
    const page = await getJSON(`v1/galleries?limit=${MAX_PAGE}`);
    if (closed) return;
    if (page.items.some((g) => g.dataset_id && !datasets.has(g.dataset_id))) {
      await loadDatasets().catch(() => {}); // names only: the ids stand in for them
    }
    setChildren(
      list,
      page.items.length === 0
        ? h(
            "p",
            { class: "muted", id: "galleries-empty" },
            "No gallery yet: build one above from a dataset and a registered model.",
          )
        : dataTable("galleries-table", COLUMNS, page.items.map(row)),
    );
    list.querySelector("table")?.classList.add("galleries");
    count.textContent =
      page.total_exact && page.total <= page.items.length
        ? `${page.total}`
        : `${page.items.length} of ${fmt.pageTotal(page)}`;
    setMessage(status, "");
    // Poll only while something is being built.
    const active = page.items.some(isActive);
    if (active && listPoll === null) listPoll = poll(refresh, POLL_MS, onError);
    if (!active && listPoll !== null) {
      listPoll.stop();
      listPoll = null;
    }
  }

  function onError(error) {
    showError(status, error, "Could not load the galleries: ");
  }

  function load() {
    return refresh().catch(onError);
  }

  // The list does not wait for the models: a registry that is down only delays the form.
  loadDatasets()
    .catch((error) => form.datasetError(error))
    .finally(load);
  form.loadModels();
  return () => {
    closed = true;
    if (listPoll !== null) listPoll.stop();
  };
}

// ---------------------------------------------------------------------------------------------
// Build a gallery
// ---------------------------------------------------------------------------------------------

function galleryImages(dataset) {
  const splits = dataset.splits || {};
  return (splits.gallery && splits.gallery.images) || dataset.image_count;
}

function newGalleryForm(onCreated) {
  const dataset = h("select", { name: "dataset_id", required: true });
  const model = h("select", { name: "model_name", required: true });
  const versions = h("datalist", { id: "gallery-version-options" });
  const version = h("input", {
    name: "model_version",
    value: "best",
    required: true,
    pattern: VERSION_PATTERN,
    list: "gallery-version-options",
    autocomplete: "off",
    title: "a version number (3) or an alias (best)",
  });
  const name = h("input", {
    name: "name",
    maxlength: "128",
    autocomplete: "off",
    placeholder: "optional",
  });
  const gpus = h(
    "select",
    { name: "gpus" },
    h("option", { value: "" }, "server default (a GPU worker where GPUs are allowed)"),
    h("option", { value: "0" }, "CPU"),
    h("option", { value: "1" }, "GPU"),
  );
  const message = formMessage();
  const submit = h("button", { type: "submit", class: "primary" }, "Build gallery");
  let models = [];

  const form = h(
    "form",
    { class: "form-grid", id: "new-gallery-form", novalidate: true },
    h("label", {}, "Dataset", dataset),
    h("label", {}, "Model", model),
    h("label", {}, "Version or alias", version, versions),
    h("label", {}, "Name", name),
    h("label", {}, "Build on", gpus),
    h("div", { class: "actions wide" }, submit, message),
  );

  function showVersions() {
    const chosen = models.find((m) => m.name === model.value);
    const options = chosen
      ? [
          ...Object.entries(chosen.aliases || {}).map(([alias, v]) => [alias, `→ v${v}`]),
          ...(chosen.latest_version ? [[chosen.latest_version, "latest"]] : []),
        ]
      : [];
    setChildren(
      versions,
      options.map(([value, label]) => h("option", { value, label })),
    );
  }
  model.addEventListener("change", showVersions);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    setMessage(message, "");
    if (!dataset.value) {
      setMessage(message, "Choose a dataset (register one on the Datasets page).");
      return;
    }
    if (!model.value) {
      setMessage(message, "Choose a model (a job that succeeds registers one).");
      return;
    }
    if (!version.checkValidity()) {
      setMessage(message, "Version or alias: a number (3) or an alias (best).");
      return;
    }
    const body = {
      dataset_id: dataset.value,
      model_name: model.value,
      model_version: version.value.trim(),
    };
    if (name.value.trim()) body.name = name.value.trim();
    if (gpus.value !== "") body.gpus = Number.parseInt(gpus.value, 10);
    const create = async () => {
      const gallery = await sendJSON("POST", "v1/galleries", body);
      const link = h("a", { href: `#/galleries/${gallery.id}` }, galleryTitle(gallery));
      const version = `${gallery.model_name} v${gallery.model_version}`;
      setMessage(message, ["Building gallery ", link, ` with ${version}.`], "ok");
      name.value = "";
      onCreated(gallery);
    };
    await whileBusy(submit, message, create, createErrorPrefix);
  });

  const element = h(
    "section",
    { class: "card", id: "new-gallery" },
    h("h2", {}, "Build a gallery"),
    h(
      "p",
      { class: "muted" },
      "Indexes the dataset's gallery images (bounding_box_test of a Market-1501 folder, every " +
        "image of a plain folder) with a registered model version, to search them with a " +
        "query image.",
    ),
    form,
  );

  return {
    element,
    setDatasets(items) {
      const ready = items.filter((d) => d.status === "ready");
      const chosen = dataset.value;
      setChildren(
        dataset,
        ready.length === 0
          ? h("option", { value: "" }, "no dataset yet: register one on the Datasets page")
          : ready.map((d) =>
              h("option", { value: d.id }, `${d.name} (${galleryImages(d)} images)`),
            ),
      );
      if (ready.some((d) => d.id === chosen)) dataset.value = chosen;
    },
    datasetError(error) {
      setChildren(dataset, h("option", { value: "" }, "the datasets did not load"));
      showError(message, error, "Could not load the datasets: ");
    },
    async loadModels() {
      try {
        models = (await getJSON("v1/models")).items;
      } catch (error) {
        setChildren(model, h("option", { value: "" }, "the models did not load"));
        showError(message, error, `Could not load the models: ${createErrorPrefix(error)}`);
        return;
      }
      setChildren(
        model,
        models.length === 0
          ? h("option", { value: "" }, "no model yet: a job that succeeds registers one")
          : models.map((m) =>
              h(
                "option",
                { value: m.name },
                m.latest_version ? `${m.name} (latest v${m.latest_version})` : m.name,
              ),
            ),
      );
      showVersions();
    },
  };
}

/** What to say before the API's message of an error a build request meets. */
function createErrorPrefix(error) {
  if (!(error instanceof ApiError)) return "";
  if (error.status === 503) return "The model registry (MLflow) is not answering: ";
  if (error.status === 409) return "Cannot build this gallery: ";
  return "";
}

// ---------------------------------------------------------------------------------------------
// #/galleries/<id>
// ---------------------------------------------------------------------------------------------

export function renderGallery(root, [galleryId]) {
  const closing = new AbortController(); // aborts the thumbnails in flight when the view goes
  const urls = new Set(); // object URLs shown, revoked when replaced or when the view goes
  let gallery = null;
  let dataset = null;
  let galleryPoll = null;

  const title = h("h1", {}, "Gallery");
  const badge = h("span", { id: "gallery-state" });
  const retryButton = h("button", { type: "button", id: "retry-gallery", hidden: true }, "Retry");
  const deleteButton = h(
    "button",
    { type: "button", id: "delete-gallery", class: "danger" },
    "Delete",
  );
  const reason = h("p", { class: "reason muted", id: "gallery-reason" });
  const progress = h("div", { class: "job-progress", id: "gallery-progress" });
  const status = alertLine("gallery-status");
  const facts = h("div", { id: "gallery-facts" });
  const timeline = h("ol", { class: "timeline", id: "gallery-timeline" });
  let shownEvents = null; // the state and reason the timeline was fetched for
  const searchCard = h("section", { class: "card", id: "gallery-search", hidden: true });
  const checkCard = humanCheckCard(galleryId);
  const results = h("section", { class: "card", id: "search-results", hidden: true });

  setChildren(root, h("p", { class: "muted" }, "Loading gallery…"));

  function layout() {
    setChildren(
      root,
      crumbs("#/galleries", "Galleries"),
      h(
        "div",
        { class: "view-head" },
        title,
        badge,
        h("div", { class: "actions" }, retryButton, deleteButton),
      ),
      reason,
      progress,
      status,
      h("section", { class: "card" }, h("h2", {}, "Summary"), facts),
      h("section", { class: "card" }, h("h2", {}, "Timeline"), timeline),
      checkCard,
      searchCard,
      results,
    );
    searchCard.append(...searchForm());
  }

  function track(url) {
    urls.add(url);
    return url;
  }

  function revoke(url) {
    if (url && urls.delete(url)) URL.revokeObjectURL(url);
  }

  function renderFacts() {
    setChildren(title, "Gallery ", h("span", { class: "gallery-name" }, galleryTitle(gallery)));
    setChildren(badge, stateBadge(gallery));
    reason.textContent = gallery.reason || "";
    reason.classList.toggle("form-error", Boolean(gallery.error));
    retryButton.hidden = !isRetryable(gallery);
    setChildren(
      progress,
      isActive(gallery)
        ? [progressBar(gallery), h("span", { class: "muted" }, `${imagesDone(gallery)} images`)]
        : null,
    );
    setChildren(
      facts,
      definitionList([
        [
          "Model",
          h(
            "span",
            {},
            h(
              "a",
              { href: `#/models/${encodeURIComponent(gallery.model_name)}` },
              gallery.model_name,
            ),
            ` version ${gallery.model_version}`,
          ),
        ],
        ["Dataset", datasetName(gallery, dataset)],
        ["Images indexed", `${gallery.images_done} of ${gallery.image_count ?? "?"}`],
        ["Skipped (unreadable)", gallery.skipped_count],
        ["Feature size", gallery.feature_dim ?? fmt.DASH],
        ["Built on", `${gallery.gpus > 0 ? "GPU" : "CPU"}, queue ${gallery.queue}`],
        ["Worker", gallery.worker_id || fmt.DASH],
        ["Created", fmt.dateTime(gallery.created_at)],
        ["Build time", fmt.duration(fmt.secondsBetween(gallery.started_at, gallery.finished_at))],
        ["Id", h("span", { class: "mono" }, gallery.id)],
      ]),
    );
    searchCard.hidden = gallery.state !== "READY";
    checkCard.hidden = gallery.state !== "READY";
  }

  async function refresh() {
    const fresh = await getJSON(galleryPath(galleryId), { signal: closing.signal });
    const first = gallery === null;
    gallery = fresh;
    if (first) layout();
    renderFacts();
    setMessage(status, "");
    loadEvents();
    if (!isActive(gallery) && galleryPoll !== null) {
      galleryPoll.stop();
      galleryPoll = null;
    }
  }

  /** The state changes, fetched again only when the state or its reason changed. */
  async function loadEvents() {
    const key = `${gallery.state} ${gallery.reason}`;
    if (key === shownEvents) return;
    shownEvents = key;
    try {
      const events = await getJSON(`${galleryPath(gallery.id)}/events`, {
        signal: closing.signal,
      });
      setChildren(timeline, ...timelineItems(events));
    } catch {
      shownEvents = null; // tried again on the next refresh
    }
  }

  async function loadDataset() {
    if (!gallery || !gallery.dataset_id) return;
    try {
      dataset = await getJSON(`v1/datasets/${gallery.dataset_id}`, { signal: closing.signal });
      renderFacts();
    } catch {
      // the id stands in for the name
    }
  }

  /** Polls while the gallery is QUEUED or BUILDING: from the start, and again after a Retry. */
  function follow() {
    if (!isActive(gallery) || galleryPoll !== null) return;
    galleryPoll = poll(refresh, POLL_MS, (error) =>
      showError(status, error, "Could not refresh the gallery: "),
    );
  }

  retryButton.addEventListener("click", async () => {
    const retried = await retryGallery(gallery, retryButton, status);
    if (!retried || closing.signal.aborted) return;
    gallery = retried;
    retryButton.disabled = false;
    renderFacts();
    loadEvents();
    follow();
  });

  deleteButton.addEventListener("click", async () => {
    if (await deleteGallery(gallery, deleteButton, status)) window.location.hash = "#/galleries";
  });

  // -- search ---------------------------------------------------------------------------------

  function searchForm() {
    const file = h("input", {
      name: "image",
      type: "file",
      required: true,
      accept: "image/jpeg,image/png,image/bmp,image/webp",
    });
    const k = h("input", {
      name: "k",
      type: "number",
      min: "1",
      max: String(MAX_K),
      step: "1",
      value: "10",
      required: true,
    });
    // the number of the camera as the hits show it (c1 is camera id 0); empty: not given
    const camera = h("input", {
      name: "camera",
      type: "number",
      min: "1",
      step: "1",
      placeholder: "optional: 2 for c2",
    });
    const message = formMessage();
    const submit = h("button", { type: "submit", class: "primary" }, "Search");
    const form = h(
      "form",
      { class: "inline-form", id: "search-form", novalidate: true },
      h("label", { class: "file-label" }, "Query image (a person crop)", file),
      h("label", { class: "k-label" }, "Hits (k)", k),
      h(
        "label",
        {
          class: "camera-label",
          title:
            "A model trained with camera normalisation normalises the query with this " +
            "camera's statistics; leave empty when the camera is not known.",
        },
        "Query camera",
        camera,
      ),
      submit,
      message,
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      setMessage(message, "");
      const query = file.files[0];
      if (!query) {
        setMessage(message, "Choose a query image: a person crop (JPEG, PNG, BMP or WebP).");
        return;
      }
      if (!k.checkValidity()) {
        setMessage(message, `Hits (k): a whole number from 1 to ${MAX_K}.`);
        return;
      }
      if (!camera.checkValidity()) {
        setMessage(message, "Query camera: the number after c (1 for c1), or empty.");
        return;
      }
      const queryCamera = camera.value === "" ? null : Number(camera.value) - 1;
      const params = new URLSearchParams({ k: k.value });
      if (queryCamera !== null) params.set("camera", String(queryCamera));
      const body = new FormData();
      body.append("image", query);
      setMessage(message, "Searching…", "ok");
      await whileBusy(submit, message, async () => {
        const response = await request(`${galleryPath(galleryId)}/search?${params}`, {
          method: "POST",
          body,
          signal: closing.signal,
        });
        const result = await response.json();
        setMessage(message, "");
        showResults(query, result, queryCamera);
      });
    });
    return [
      h("h2", {}, "Search"),
      h(
        "p",
        { class: "muted" },
        "Which gallery images show the person of a query image, and which cameras saw them.",
      ),
      form,
    ];
  }

  let shown = null; // {urls, abort} of the results on screen

  function showResults(query, result, queryCamera) {
    if (shown) {
      shown.abort.abort();
      shown.urls.forEach(revoke);
    }
    const abort = new AbortController();
    closing.signal.addEventListener("abort", () => abort.abort(), { once: true });
    shown = { urls: [], abort };
    const queryUrl = track(URL.createObjectURL(query));
    shown.urls.push(queryUrl);

    const hits = result.hits;
    const cards = hits.map((hit) => hitCard(hit));
    setChildren(
      results,
      h("h2", {}, `Results: ${hits.length} closest images`),
      h(
        "div",
        { class: "search-summary" },
        h(
          "figure",
          { class: "query-figure", id: "query-figure" },
          h("img", { src: queryUrl, alt: `query image ${result.query}`, id: "query-image" }),
          h(
            "figcaption",
            {},
            h("span", { class: "muted" }, "query "),
            result.query,
            queryCamera === null
              ? null
              : h("span", { class: "chip", id: "query-camera" }, cameraLabel(queryCamera)),
          ),
        ),
        cameraSummary(hits),
      ),
      hits.length === 0
        ? h("p", { class: "muted" }, "The gallery is empty.")
        : h(
            "div",
            { class: "hits", id: "hits" },
            cards.map((c) => c.element),
          ),
    );
    results.hidden = false;
    loadThumbnails(cards, shown);
  }

  function hitCard(hit) {
    const img = h("img", { alt: `rank ${hit.rank}: ${hit.path}`, class: "thumb" });
    const frame = h("div", { class: "thumb-frame loading" }, img);
    const element = h(
      "figure",
      {
        class: "hit",
        dataset: { rank: hit.rank, position: hit.position, camera: cameraLabel(hit.camera_id) },
      },
      frame,
      h(
        "figcaption",
        {},
        h(
          "div",
          { class: "hit-line" },
          h("span", { class: "hit-rank" }, `#${hit.rank}`),
          h("span", { class: "hit-score", title: "cosine similarity" }, fmt.number(hit.score, 3)),
        ),
        h(
          "div",
          { class: "hit-line" },
          h("span", { class: "chip hit-camera" }, cameraLabel(hit.camera_id)),
          typeof hit.person_id === "number"
            ? h("span", { class: "hit-person muted" }, `person ${hit.person_id}`)
            : null,
        ),
        h("div", { class: "hit-path mono muted", title: hit.path }, hit.path),
      ),
    );
    return { hit, img, frame, element };
  }

  /** Fetches the hits' images a few at a time, best first; a failure shows why in its frame. */
  async function loadThumbnails(cards, { urls: owned, abort }) {
    const { signal } = abort;
    const queue = [...cards];
    const fetchOne = async (card) => {
      try {
        const response = await request(`${galleryPath(galleryId)}/images/${card.hit.position}`, {
          signal,
        });
        const blob = await response.blob();
        if (signal.aborted) return;
        const url = track(URL.createObjectURL(blob));
        owned.push(url);
        card.img.src = url;
        card.frame.classList.remove("loading");
      } catch (error) {
        if (error.name !== "AbortError" && !signal.aborted) showThumbError(card.frame, error);
      }
    };
    const worker = async () => {
      while (queue.length > 0 && !signal.aborted) await fetchOne(queue.shift());
    };
    await Promise.all(Array.from({ length: THUMBNAIL_FETCHES }, worker));
  }

  // -- start ------------------------------------------------------------------------------------

  refresh()
    .then(() => {
      loadDataset();
      follow();
    })
    .catch((error) => {
      const back = crumbs("#/galleries", "Galleries");
      showLoadError(root, back, error, `Could not load gallery ${galleryId}: `);
    });

  return () => {
    closing.abort();
    if (galleryPoll !== null) galleryPoll.stop();
    for (const url of [...urls]) revoke(url);
  };
}

/**
 * The card that opens the gallery's pair check (#/checks/<id>), made on first use: a person
 * judges pairs of its crops and the answers estimate the model version's precision.
 */
function humanCheckCard(galleryId) {
  const message = formMessage();
  const open = h("button", { type: "button", class: "primary", id: "open-check" }, "Check pairs");
  open.addEventListener("click", async () => {
    open.disabled = true;
    setMessage(message, "");
    try {
      const check = await sendJSON("POST", "v1/checks", { gallery_id: galleryId });
      window.location.hash = `#/checks/${check.id}`;
    } catch (error) {
      showError(message, error, "Could not open the check: ");
      open.disabled = false;
    }
  });
  return h(
    "section",
    { class: "card", id: "gallery-check", hidden: true },
    h("h2", {}, "Check by hand"),
    h(
      "p",
      { class: "muted" },
      "Judge a few dozen pairs of crops (a query and its nearest crops from other cameras): " +
        "minutes of your time give the model's precision at ranks 1 and 5 with an interval, " +
        "and the answers count again for the next version's check of this dataset.",
    ),
    h("div", { class: "actions" }, open, message),
  );
}

/** Hits per camera, most first: which cameras saw the person of the query. */
function cameraSummary(hits) {
  const cameras = new Map(); // label -> {count, best score, best rank}
  for (const hit of hits) {
    const label = cameraLabel(hit.camera_id);
    const entry = cameras.get(label) || { label, count: 0, score: hit.score, rank: hit.rank };
    entry.count += 1;
    cameras.set(label, entry);
  }
  const rows = [...cameras.values()].sort((a, b) => b.count - a.count || a.rank - b.rank);
  if (rows.length === 0) return null;
  const best = hits[0];
  return h(
    "div",
    { class: "camera-summary", id: "camera-summary" },
    h("h3", {}, "Cameras among the hits"),
    h(
      "p",
      { class: "summary-line" },
      `Most hits: ${rows[0].label} (${rows[0].count} of ${hits.length}). Best match: `,
      `${cameraLabel(best.camera_id)} (#1, score ${fmt.number(best.score, 3)}).`,
    ),
    h(
      "table",
      { class: "data compact" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", {}, "Camera"),
          h("th", { class: "num" }, "Hits"),
          h("th", { class: "num" }, "Best rank"),
          h("th", { class: "num" }, "Best score"),
        ),
      ),
      h(
        "tbody",
        {},
        rows.map((r) =>
          h(
            "tr",
            { dataset: { camera: r.label } },
            h("td", {}, r.label),
            h("td", { class: "num" }, r.count),
            h("td", { class: "num" }, `#${r.rank}`),
            h("td", { class: "num" }, fmt.number(r.score, 3)),
          ),
        ),
      ),
    ),
  );
}
