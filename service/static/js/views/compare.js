// #/compare/<id>,<id>,...: jobs side by side: their numbers, mAP and total loss per epoch on
// shared charts, and the configuration keys whose values differ.

import { getJSON } from "../api.js";
import { EpochChart, epochSeries } from "../charts.js";
import { h, setChildren } from "../dom.js";
import * as fmt from "../format.js";
import { errorBox } from "../messages.js";
import { poll } from "../poll.js";
import { crumbs, dataTable, stateBadge } from "../widgets.js";

const REFRESH_MS = 10000;
/** Set by the service for every job, so they always differ: not a difference worth showing. */
const PER_JOB_KEYS = new Set(["runtime.output_dir"]);

/** {"a.b": 1, ...} from {"a": {"b": 1}}; lists are values. */
function flatten(value, prefix = "", out = {}) {
  for (const [key, v] of Object.entries(value || {})) {
    const path = prefix ? `${prefix}.${key}` : key;
    if (v !== null && typeof v === "object" && !Array.isArray(v)) flatten(v, path, out);
    else out[path] = v;
  }
  return out;
}

/** [[key, [value per job]], ...] for the keys whose values are not all the same. */
function configDifferences(configs) {
  const flat = configs.map((c) => flatten(c));
  const keys = [...new Set(flat.flatMap((f) => Object.keys(f)))].sort();
  return keys
    .filter((key) => !PER_JOB_KEYS.has(key))
    .map((key) => [key, flat.map((f) => (key in f ? JSON.stringify(f[key]) : fmt.DASH))])
    .filter(([, values]) => new Set(values).size > 1);
}

/** The training epoch's record with the highest `key`; epoch 0 (before training) is none. */
function best(records, key) {
  return records
    .filter((r) => r.epoch >= 1 && typeof r[key] === "number")
    .reduce((top, r) => (top === null || r[key] > top[key] ? r : top), null);
}

export function renderCompare(root, [idList]) {
  const ids = [...new Set(idList.split(",").filter(Boolean))];
  const summary = h("div", { id: "compare-summary" });
  const mapBox = h("div");
  const lossBox = h("div");
  const differences = h("div", { id: "compare-config" });
  setChildren(
    root,
    crumbs("#/jobs", "Jobs"),
    h("div", { class: "view-head" }, h("h1", {}, `Compare ${ids.length} jobs`)),
    summary,
    h(
      "div",
      { class: "grid-2" },
      h("section", { class: "card" }, h("h2", {}, "mAP per epoch (%)"), mapBox),
      h("section", { class: "card" }, h("h2", {}, "Total loss per epoch"), lossBox),
    ),
    h("section", { class: "card" }, h("h2", {}, "Configuration differences"), differences),
  );
  const mapChart = new EpochChart(mapBox, {
    id: "compare-map-chart",
    yTitle: "mAP %",
    emptyText: "No evaluation yet.",
  });
  const lossChart = EpochChart.loss(lossBox, "compare-loss-chart");
  let runs = [];

  async function load() {
    runs = await Promise.all(
      ids.map(async (id) => {
        const [job, records] = await Promise.all([
          getJSON(`v1/jobs/${encodeURIComponent(id)}`),
          getJSON(`v1/jobs/${encodeURIComponent(id)}/metrics`),
        ]);
        return { job, records, label: fmt.shortId(job.id) };
      }),
    );
    render();
  }

  function render() {
    setChildren(
      summary,
      dataTable(
        "compare-table",
        [
          ["Job", ""],
          ["State", ""],
          ["Epoch", "num"],
          ["Best mAP", "num"],
          ["at epoch", "num optional"],
          ["Last mAP", "num"],
          ["Last R1", "num optional"],
          ["Last loss", "num optional"],
          ["Time", "optional"],
        ],
        runs.map(({ job, records, label }) => {
          const top = best(records, "eval/mAP");
          return h(
            "tr",
            { dataset: { jobId: job.id } },
            h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, label)),
            h("td", {}, stateBadge(job)),
            h("td", { class: "num" }, fmt.epochOf(job)),
            h("td", { class: "num cell-best-map" }, fmt.number(top && top["eval/mAP"], 1)),
            h("td", { class: "num optional" }, top ? top.epoch : fmt.DASH),
            h("td", { class: "num" }, fmt.number(fmt.latestEval(job).mAP, 1)),
            h("td", { class: "num optional" }, fmt.number(fmt.latestEval(job).r1, 1)),
            h("td", { class: "num optional" }, fmt.number(fmt.latestLosses(job).total, 3)),
            h("td", { class: "optional" }, fmt.timing(job)),
          );
        }),
      ),
    );
    mapChart.update(runs.map((r) => epochSeries(r.records, "eval/mAP", r.label)));
    lossChart.update(runs.map((r) => epochSeries(r.records, "loss/total", r.label)));
    const diff = configDifferences(runs.map((r) => r.job.resolved_config));
    setChildren(
      differences,
      diff.length === 0
        ? h("p", { class: "muted" }, "Same configuration.")
        : dataTable(
            "config-diff",
            [["Key", ""], ...runs.map((r) => [r.label, ""])],
            diff.map(([key, values]) =>
              h(
                "tr",
                { dataset: { key } },
                h("td", { class: "mono" }, key),
                values.map((v) => h("td", { class: "mono" }, v)),
              ),
            ),
          ),
    );
  }

  const refresh = poll(
    async () => {
      if (runs.length > 0 && runs.every((r) => fmt.isFinal(r.job))) return;
      await load();
    },
    REFRESH_MS,
    (error) => setChildren(summary, errorBox(error)),
  );
  refresh.now();
  return () => {
    refresh.stop();
    mapChart.destroy();
    lossChart.destroy();
  };
}
