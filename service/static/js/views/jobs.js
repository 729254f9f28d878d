// #/jobs: the key owner's jobs, newest first, kept current without reloading; the New job form
// (a preset, overrides, a preview of the resolved configuration); ticking jobs to compare them
// (#/compare/<id>,<id>,...).
//
// Polling: every job not yet finished is asked for with If-None-Match every JOB_POLL_MS (an
// unchanged job costs a 304); the list itself, which has no ETag, is fetched every LIST_POLL_MS
// to pick up jobs submitted elsewhere.

import { ConditionalResource, getJSON, sendJSON } from "../api.js";
import { h, setChildren } from "../dom.js";
import * as fmt from "../format.js";
import {
  alertLine,
  describeError,
  formMessage,
  setMessage,
  showError,
  whileBusy,
} from "../messages.js";
import { poll } from "../poll.js";
import { jsonBlock, progressBar, stateBadge } from "../widgets.js";

const JOB_POLL_MS = 2000;
const LIST_POLL_MS = 15000;
const PAGE_SIZE = 50;
const MAX_PAGE = 200; // the API's largest limit

const COLUMNS = [
  ["", "cell-select"],
  ["Job", ""],
  ["State", ""],
  ["Progress", ""],
  ["Epoch", "num optional"],
  ["Loss", "num"],
  ["mAP", "num"],
  ["R1", "num optional"],
  ["Dataset", "optional"],
  ["Time", ""],
];

/** Jobs ticked for comparison; kept while the tab lives, across visits to other pages. */
const selected = new Set();

export function renderJobs(root) {
  const entries = new Map(); // job id -> {job, resource, row}
  const datasets = new Map(); // dataset id -> dataset
  let limit = PAGE_SIZE;
  let listResource = new ConditionalResource(`v1/jobs?limit=${limit}`);

  const tbody = h("tbody");
  const count = h("span", { class: "muted", id: "jobs-count" }, "loading…");
  const status = alertLine("jobs-status");
  const empty = h("p", { class: "muted", hidden: true }, "No jobs yet: submit one with New job.");
  const more = h("button", { type: "button", hidden: true }, "Show more");
  const compare = h("a", { class: "button", id: "compare-link", hidden: true });
  const form = newJobForm(datasets, (job) => {
    upsert(job);
    placeRows([job.id, ...[...entries.keys()].filter((id) => id !== job.id)]);
    listPoll.now(); // the count, and anything submitted elsewhere meanwhile
  });
  const table = h(
    "table",
    { class: "data jobs", id: "jobs-table" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        COLUMNS.map(([name, cls]) => h("th", { class: cls || null }, name)),
      ),
    ),
    tbody,
  );
  setChildren(
    root,
    h(
      "div",
      { class: "view-head" },
      h("h1", {}, "Jobs"),
      count,
      h("div", { class: "actions" }, compare),
    ),
    form.element,
    status,
    h("div", { class: "table-wrap" }, table),
    empty,
    more,
  );

  function upsert(job) {
    let entry = entries.get(job.id);
    if (entry === undefined) {
      entry = { job, resource: new ConditionalResource(`v1/jobs/${job.id}`), row: h("tr") };
      entry.row.dataset.jobId = job.id;
      entries.set(job.id, entry);
    }
    entry.job = job;
    renderRow(entry);
    return entry;
  }

  function placeRows(ids) {
    setChildren(tbody, ...ids.map((id) => entries.get(id).row));
    empty.hidden = ids.length > 0;
    for (const id of [...selected]) if (!entries.has(id)) selected.delete(id);
    updateCompare();
  }

  function updateCompare() {
    compare.hidden = selected.size < 2;
    compare.href = `#/compare/${[...selected].join(",")}`;
    compare.textContent = `Compare ${selected.size} jobs`;
  }

  function selectBox(job) {
    const box = h("input", {
      type: "checkbox",
      checked: selected.has(job.id),
      "aria-label": `compare job ${fmt.shortId(job.id)}`,
    });
    box.addEventListener("change", () => {
      if (box.checked) selected.add(job.id);
      else selected.delete(job.id);
      updateCompare();
    });
    return box;
  }

  function renderRow({ job, row }) {
    const losses = fmt.latestLosses(job);
    const evaluation = fmt.latestEval(job);
    const dataset = job.dataset_id ? datasets.get(job.dataset_id) : null;
    setChildren(
      row,
      h("td", { class: "cell-select" }, selectBox(job)),
      h(
        "td",
        { class: "cell-job" },
        h("a", { href: `#/jobs/${job.id}`, class: "mono" }, fmt.shortId(job.id)),
        h("span", { class: "sub muted" }, fmt.dateTime(job.created_at)),
      ),
      h("td", { class: "cell-state" }, stateBadge(job)),
      h("td", { class: "cell-progress" }, progressBar(job)),
      h("td", { class: "cell-epoch optional num" }, fmt.epochOf(job)),
      h("td", { class: "cell-loss num" }, fmt.number(losses.total, 3)),
      h("td", { class: "cell-map num" }, fmt.number(evaluation.mAP, 1)),
      h("td", { class: "cell-r1 optional num" }, fmt.number(evaluation.r1, 1)),
      h(
        "td",
        { class: "cell-dataset optional" },
        dataset ? dataset.name : job.dataset_id ? fmt.shortId(job.dataset_id) : "(deleted)",
      ),
      h("td", { class: "cell-time" }, fmt.timing(job)),
    );
  }

  let datasetsLoading = null; // one request at a time, shared by whoever asks meanwhile

  function loadDatasets() {
    datasetsLoading ??= getJSON(`v1/datasets?limit=${MAX_PAGE}`)
      .then((page) => {
        datasets.clear();
        for (const d of page.items) datasets.set(d.id, d);
        form.setDatasets(page.items);
        for (const entry of entries.values()) renderRow(entry);
      })
      .finally(() => {
        datasetsLoading = null;
      });
    return datasetsLoading;
  }

  async function refreshList() {
    const page = await listResource.fetch();
    if (page === null) {
      setMessage(status, ""); // the page did not change (a 304)
      return;
    }
    const ids = page.items.map((job) => upsert(job).job.id);
    for (const id of [...entries.keys()]) if (!ids.includes(id)) entries.delete(id);
    placeRows(ids);
    count.textContent = `${page.items.length} of ${fmt.pageTotal(page)}`;
    more.hidden = (page.total_exact && page.total <= page.items.length) || limit >= MAX_PAGE;
    if (page.items.some((job) => job.dataset_id && !datasets.has(job.dataset_id))) {
      await loadDatasets();
    }
    setMessage(status, "");
  }

  async function refreshActive() {
    const active = [...entries.values()].filter((entry) => !fmt.isFinal(entry.job));
    await Promise.all(
      active.map(async (entry) => {
        const job = await entry.resource.fetch();
        if (job !== null) entry.job = job;
        renderRow(entry); // the running time moves on even when the job did not change
      }),
    );
    setMessage(status, "");
  }

  const onError = (error) =>
    showError(status, error, "Could not refresh the jobs: ");
  more.addEventListener("click", () => {
    limit = Math.min(MAX_PAGE, limit + PAGE_SIZE);
    listResource = new ConditionalResource(`v1/jobs?limit=${limit}`);
    listPoll.now();
  });
  form.element.addEventListener("toggle", () => {
    if (!form.element.open) return;
    loadDatasets().catch(onError);
    form.loadPresets();
  });

  const listPoll = poll(refreshList, LIST_POLL_MS, onError);
  const jobPoll = poll(refreshActive, JOB_POLL_MS, onError);
  Promise.all([loadDatasets(), refreshList()]).catch(onError);
  return () => {
    listPoll.stop();
    jobPoll.stop();
  };
}

// ---------------------------------------------------------------------------------------------
// New job
// ---------------------------------------------------------------------------------------------

/** 128 random bits as hex (crypto.randomUUID needs a secure context; plain http has none). */
function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The overrides textarea as an object; throws an Error saying what is wrong. */
function parseOverrides(text) {
  if (!text.trim()) return {};
  let value;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new Error(`Overrides are not valid JSON (${error.message})`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new Error('Overrides must be a JSON object, e.g. {"schedule.epochs": 30}');
  }
  return value;
}

function optionalInt(input) {
  return input.value.trim() === "" ? undefined : Number.parseInt(input.value, 10);
}

/**
 * The New job form: dataset, preset, overrides (JSON), GPUs, max retries; Preview shows the
 * configuration the job would run with (POST v1/jobs/preview), and any change hides it again.
 * One idempotency key per distinct submission, so a double click or a retry after a network
 * error makes one job.
 */
function newJobForm(datasets, onSubmitted) {
  const dataset = h("select", { name: "dataset_id", required: true });
  const preset = h("select", { name: "preset" }, h("option", { value: "" }, "none (defaults)"));
  const presetAbout = h("p", { class: "muted preset-about", id: "preset-about", hidden: true });
  const presets = new Map(); // name -> {name, purpose, measured, ...}
  const config = h("textarea", {
    name: "config",
    rows: "6",
    spellcheck: "false",
    placeholder: '{"schedule.epochs": 30, "loss": {"gsl": {"threshold": 0.55}}}',
  });
  const gpus = h("input", {
    name: "gpus",
    type: "number",
    min: "0",
    step: "1",
    placeholder: "server default",
  });
  const retries = h("input", {
    name: "max_retries",
    type: "number",
    min: "0",
    step: "1",
    value: "0",
  });
  const message = formMessage();
  const submit = h("button", { type: "submit", class: "primary" }, "Submit job");
  const previewButton = h("button", { type: "button" }, "Preview configuration");
  const preview = h("div", { class: "wide", id: "job-preview", hidden: true });
  const defaults = h("details", { class: "defaults" }, h("summary", {}, "Default configuration"));
  let idempotencyKey = randomKey();

  defaults.addEventListener("toggle", async () => {
    if (!defaults.open || defaults.querySelector("pre")) return;
    try {
      defaults.append(jsonBlock(await getJSON("v1/config/defaults")));
    } catch (error) {
      defaults.append(h("p", { class: "form-error" }, describeError(error)));
    }
  });

  const form = h(
    "form",
    { class: "form-grid", id: "new-job-form", novalidate: true },
    h("label", {}, "Dataset", dataset),
    h("label", {}, "GPUs (0: CPU)", gpus),
    h("label", {}, "Max retries", retries),
    h("div", { class: "wide" }, h("label", {}, "Preset", preset), presetAbout),
    h(
      "label",
      { class: "wide" },
      "Overrides (JSON, nested or dotted keys; over the preset's)",
      config,
    ),
    h("div", { class: "actions wide" }, submit, previewButton, message),
    preview,
    h("div", { class: "wide" }, defaults),
  );
  form.addEventListener("input", () => {
    idempotencyKey = randomKey();
    preview.hidden = true; // it no longer shows what would be submitted
  });
  preset.addEventListener("change", showPresetAbout);

  function showPresetAbout() {
    const chosen = presets.get(preset.value);
    presetAbout.hidden = !chosen;
    if (chosen) {
      setChildren(
        presetAbout,
        chosen.purpose,
        h("br"),
        h("span", { class: "preset-measured" }, `Measured: ${chosen.measured}`),
      );
    }
  }

  /** The request as the form has it, or null once the message says what is missing. */
  function requestBody() {
    setMessage(message, "");
    const body = {
      dataset_id: dataset.value,
      max_retries: optionalInt(retries) ?? 0,
      gpus: optionalInt(gpus),
      preset: preset.value || undefined,
    };
    if (!body.dataset_id) {
      setMessage(message, "Choose a dataset (register one on the Datasets page).");
      return null;
    }
    try {
      body.config = parseOverrides(config.value);
    } catch (error) {
      setMessage(message, error.message);
      return null;
    }
    return body;
  }

  previewButton.addEventListener("click", async () => {
    const body = requestBody();
    if (body === null) return;
    await whileBusy(previewButton, message, async () => {
      const resolved = await sendJSON("POST", "v1/jobs/preview", body);
      setChildren(
        preview,
        h("h3", {}, `Resolved configuration (gpus: ${resolved.gpus}, queue: ${resolved.queue})`),
        jsonBlock(resolved.config, "job-preview-config"),
      );
      preview.hidden = false;
    });
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = requestBody();
    if (body === null) return;
    body.idempotency_key = idempotencyKey;
    await whileBusy(submit, message, async () => {
      const job = await sendJSON("POST", "v1/jobs", body);
      idempotencyKey = randomKey();
      const link = h("a", { href: `#/jobs/${job.id}` }, fmt.shortId(job.id));
      setMessage(message, ["Submitted job ", link, "."], "ok");
      onSubmitted(job);
    });
  });

  const element = h(
    "details",
    { class: "card new-job", id: "new-job" },
    h("summary", {}, "New job"),
    form,
  );
  let presetsLoaded = false;

  return {
    element,
    /** The presets' names in the select, once; a failure says so and leaves "none". */
    async loadPresets() {
      if (presetsLoaded) return;
      presetsLoaded = true;
      try {
        for (const p of await getJSON("v1/presets")) presets.set(p.name, p);
      } catch (error) {
        presetsLoaded = false;
        showError(message, error, "Could not load the presets: ");
        return;
      }
      preset.append(...[...presets.keys()].map((name) => h("option", { value: name }, name)));
      showPresetAbout();
    },
    setDatasets(items) {
      const chosen = dataset.value;
      setChildren(
        dataset,
        ...(items.length === 0
          ? [h("option", { value: "" }, "no dataset yet: register one on the Datasets page")]
          : items.map((d) => h("option", { value: d.id }, `${d.name} (${d.image_count} images)`))),
      );
      if (items.some((d) => d.id === chosen)) dataset.value = chosen;
    },
  };
}
