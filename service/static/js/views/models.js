// #/models and #/models/<name>: the key owner's registered models (MLflow's registry, through
// GET v1/models), the versions of one with their metrics and the jobs that made them, which
// version holds "best" and by which rule (service/core/best.py), pointing an alias at a version,
// and downloading a version's weights.

import { ApiError, download, getJSON, sendJSON } from "../api.js";
import { h, setChildren } from "../dom.js";
import * as fmt from "../format.js";
import { errorBox, formMessage, setMessage, whileBusy } from "../messages.js";
import { dataTable, externalLink } from "../widgets.js";

const ALIAS_PATTERN = "[A-Za-z][A-Za-z0-9_\\-]{0,63}"; // service/routers/models.py AliasName

const modelPath = (name) => `v1/models/${encodeURIComponent(name)}`;

export function renderModels(root, [selected]) {
  const list = h("div", { id: "models-list" }, h("p", { class: "muted" }, "Loading models…"));
  const detail = h("section", { class: "card", id: "model-detail", hidden: true });
  setChildren(root, h("div", { class: "view-head" }, h("h1", {}, "Models")), list, detail);
  let closed = false;

  async function load() {
    let page;
    try {
      page = await getJSON("v1/models");
    } catch (error) {
      setChildren(list, registryError(error));
      return;
    }
    if (closed) return;
    setChildren(
      list,
      page.items.length === 0
        ? h("p", { class: "muted" }, "No model yet: a job that succeeds registers its model.")
        : dataTable(
            "models-table",
            [
              ["Model", ""],
              ["Latest version", "num"],
              ["Aliases", ""],
              ["Updated", "optional"],
              ["MLflow", "optional"],
            ],
            page.items.map((m) => modelRow(m, m.name === selected)),
          ),
    );
    if (selected !== undefined) await loadVersions(selected);
  }

  async function loadVersions(name) {
    detail.hidden = false;
    let page;
    try {
      page = await getJSON(`${modelPath(name)}/versions`);
    } catch (error) {
      setChildren(detail, h("h2", {}, name), errorBox(error));
      return;
    }
    if (closed) return;
    setChildren(
      detail,
      h("h2", {}, `${name}: versions`),
      bestRule(page.items),
      dataTable(
        "versions-table",
        [
          ["Version", "num"],
          ["Aliases", ""],
          ["mAP", "num"],
          ["R1", "num"],
          ["Job", "optional"],
          ["MLflow run", "optional"],
          ["Registered", "optional"],
          ["Weights", ""],
        ],
        page.items.map((v) => versionRow(name, v)),
      ),
      page.items.length > 0 ? aliasForm(name, page.items, load) : null,
    );
  }

  load();
  return () => {
    closed = true;
  };
}

/** A missing route (an API without the registry) says so; anything else shows its message. */
function registryError(error) {
  if (error instanceof ApiError && error.status === 404) {
    return h(
      "p",
      { class: "notice", id: "registry-unavailable" },
      "Model registry not available on this server (it does not serve /v1/models).",
    );
  }
  return errorBox(error, "Could not load the models: ");
}

/** How "best" is chosen (service/core/best.py), in the order the rule tries its evidence. */
const BEST_RULE_STEPS = [
  "mAP, where versions were evaluated on a labelled query/gallery split;",
  "otherwise the human check's precision@1, where people judged a version's answers;",
  "otherwise the kept label-free signal of the version's last evaluation;",
  "otherwise the newest version.",
];

/** What best_value is, per rule: mAP in percent, a precision or a signal between 0 and 1. */
function bestValue(rule, value) {
  return rule === "mAP" ? `${fmt.number(value, 1)} %` : fmt.number(value, 3);
}

/** Which version holds "best" and why, and the rule itself (folded). */
function bestRule(versions) {
  const holder = versions.find((v) => (v.aliases || []).includes("best"));
  let why;
  if (!holder) {
    why = "No version holds best yet.";
  } else if (!holder.best_rule) {
    why = `best → v${holder.version} (no rule recorded: set before the rule existed).`;
  } else if (holder.best_value === null || holder.best_value === undefined) {
    why = `best → v${holder.version}, ${holder.best_rule}.`;
  } else {
    const value = bestValue(holder.best_rule, holder.best_value);
    why = `best → v${holder.version}, by ${holder.best_rule}: ${value}.`;
  }
  return h(
    "div",
    { id: "best-rule", class: "best-rule" },
    h("p", { id: "best-choice" }, why),
    h(
      "details",
      {},
      h("summary", {}, "How best is chosen"),
      h(
        "p",
        {},
        "Among all versions, the strongest kind of evidence any version has decides, and only " +
          "the versions carrying it compete (highest wins, a tie goes to the newest):",
      ),
      h(
        "ol",
        {},
        BEST_RULE_STEPS.map((step) => h("li", {}, step)),
      ),
      h(
        "p",
        { class: "muted" },
        "It is applied again whenever a job registers a version and whenever a human check " +
          "logs answers, so best set by hand lasts until then; pin a version with another alias.",
      ),
    ),
  );
}

function aliasChips(labels) {
  return labels.length > 0
    ? h(
        "span",
        { class: "chips" },
        labels.map((t) => h("span", { class: "chip" }, t)),
      )
    : fmt.DASH;
}

function modelRow(model, isSelected) {
  const aliases = Object.entries(model.aliases || {}).map(([alias, v]) => `${alias} → v${v}`);
  return h(
    "tr",
    { dataset: { model: model.name }, class: isSelected ? "selected" : null },
    h(
      "td",
      {},
      h("a", { href: `#/models/${encodeURIComponent(model.name)}` }, model.name),
      model.description ? h("span", { class: "sub muted" }, model.description) : null,
    ),
    h("td", { class: "num" }, model.latest_version ? `v${model.latest_version}` : fmt.DASH),
    h("td", {}, aliasChips(aliases)),
    h("td", { class: "optional" }, fmt.dateTime(model.updated_at)),
    h("td", { class: "optional" }, externalLink(model.mlflow_url, "open") || fmt.DASH),
  );
}

function versionRow(name, v) {
  const metrics = v.metrics || {};
  const message = h("span", { class: "form-error", role: "alert", hidden: true });
  const button = h("button", { type: "button", class: "link-button" }, "download");
  button.addEventListener("click", async () => {
    setMessage(message, "");
    await whileBusy(button, message, async () => {
      const path = `${modelPath(name)}/versions/${encodeURIComponent(v.version)}/weights`;
      await download(path, `${name}-v${v.version}.pt`);
    });
  });
  const run = v.run_id ? fmt.shortId(v.run_id) : fmt.DASH;
  return h(
    "tr",
    { dataset: { version: v.version } },
    h("td", { class: "num" }, `v${v.version}`),
    h("td", {}, aliasChips(v.aliases || [])),
    h("td", { class: "num" }, fmt.number(metrics.mAP, 1)),
    h("td", { class: "num" }, fmt.number(metrics.r1, 1)),
    h(
      "td",
      { class: "optional" },
      v.job_id
        ? h("a", { href: `#/jobs/${v.job_id}`, class: "mono" }, fmt.shortId(v.job_id))
        : fmt.DASH,
    ),
    h("td", { class: "optional mono" }, externalLink(v.mlflow_url, run) || run),
    h("td", { class: "optional" }, fmt.dateTime(v.created_at)),
    h("td", {}, button, " ", message),
  );
}

/** Points an alias (default "best") at a version: PUT v1/models/{name}/aliases/{alias}. */
function aliasForm(name, versions, onChanged) {
  const alias = h("input", {
    name: "alias",
    value: "best",
    required: true,
    pattern: ALIAS_PATTERN,
    autocomplete: "off",
  });
  const version = h(
    "select",
    { name: "version" },
    versions.map((v) => {
      const map = v.metrics && v.metrics.mAP;
      return h(
        "option",
        { value: v.version },
        `v${v.version}${map ? ` (mAP ${fmt.number(map, 1)})` : ""}`,
      );
    }),
  );
  const message = formMessage();
  const submit = h("button", { type: "submit" }, "Set alias");
  const form = h(
    "form",
    { class: "inline-form", id: "alias-form", novalidate: true },
    h("label", {}, "Alias", alias),
    h("label", {}, "Version", version),
    submit,
    message,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!alias.checkValidity()) {
      setMessage(message, "alias: a letter, then letters, digits, '_' or '-' (at most 64)");
      return;
    }
    await whileBusy(submit, message, async () => {
      const path = `${modelPath(name)}/aliases/${encodeURIComponent(alias.value)}`;
      await sendJSON("PUT", path, { version: version.value });
      await onChanged(); // redraws the list and this form with the alias moved
    });
  });
  return form;
}
