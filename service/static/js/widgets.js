// Small pieces shared by the views: state badges, timelines, progress bars, key/value lists.

import { h } from "./dom.js";
import { dateTime as fmtDateTime, percent } from "./format.js";

/** The link back above a view: crumbs("#/jobs", "Jobs"). */
export function crumbs(href, text) {
  return h("p", { class: "crumbs" }, h("a", { href }, `← ${text}`));
}

/** The state in its colour (dashboard.css: .state-RUNNING ...); the reason as tooltip. */
export function stateBadge(job) {
  return h("span", { class: `state state-${job.state}`, title: job.reason || null }, job.state);
}

/** The <li>s of a timeline: each state change of a job or a gallery, when and why. */
export function timelineItems(events) {
  return events.map((e) =>
    h(
      "li",
      { dataset: { state: e.to_state } },
      h("span", { class: "when muted" }, fmtDateTime(e.at)),
      " ",
      stateBadge({ state: e.to_state, reason: e.reason }),
      " ",
      h("span", { class: "why" }, e.reason),
    ),
  );
}

export function progressBar(job) {
  const value = typeof job.progress === "number" ? job.progress : 0;
  return h(
    "span",
    { class: "progress-cell" },
    h("progress", { max: "1", value: String(value), "aria-label": "progress" }),
    h("span", { class: "progress-text" }, percent(value)),
  );
}

/** A <dl> of [label, value] pairs; a value may be a node. */
export function definitionList(pairs, className = "facts") {
  return h(
    "dl",
    { class: className },
    pairs.map(([label, value]) => [h("dt", {}, label), h("dd", {}, value)]),
  );
}

/** Pretty JSON in a scrollable block. */
export function jsonBlock(value, id = null) {
  return h("pre", { class: "code", id }, JSON.stringify(value, null, 2));
}

/** A table in its scrolling box; `columns` are [label, className] pairs, `rows` <tr>s. */
export function dataTable(id, columns, rows) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "data", id },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          columns.map(([label, cls]) => h("th", { class: cls || null }, label)),
        ),
      ),
      h("tbody", {}, rows),
    ),
  );
}

/** Only http(s) URLs from the API become links (never a javascript: URL). */
export function externalLink(url, text, id = null) {
  return typeof url === "string" && /^https?:\/\//i.test(url)
    ? h("a", { href: url, target: "_blank", rel: "noopener noreferrer", id }, text)
    : null;
}
