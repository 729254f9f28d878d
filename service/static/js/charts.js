// Line charts of a job's per-epoch history (GET v1/jobs/{id}/metrics), drawn with Chart.js
// (static/vendor/chart.umd.js, loaded by index.html as window.Chart).

import { h } from "./dom.js";

// Colour-blind-safe (Okabe-Ito), in the order series appear.
const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000"];

/** Evaluation curves worth plotting, in percent: the rest (query counts) are not curves. */
const EVAL_SERIES = [
  ["eval/mAP", "mAP"],
  ["eval/r1", "R1"],
  ["eval/r5", "R5"],
  ["eval/mINP", "mINP"],
];

/** One series per loss term ("loss/total", "loss/instance", ...), x = epoch. */
export function lossSeries(records) {
  const terms = [];
  for (const record of records) {
    for (const key of Object.keys(record)) {
      if (key.startsWith("loss/") && !terms.includes(key)) terms.push(key);
    }
  }
  // The total first: it is the curve people look at.
  terms.sort((a, b) => (a === "loss/total" ? -1 : b === "loss/total" ? 1 : 0));
  return terms.map((key) => epochSeries(records, key, key.slice("loss/".length)));
}

/**
 * mAP, R1, R5, mINP per evaluated epoch (epochs without evaluation have no point); the first
 * point is at epoch 0 when the job evaluated before training (eval.at_start).
 */
export function evalSeries(records) {
  return EVAL_SERIES.filter(([key]) => records.some((r) => typeof r[key] === "number")).map(
    ([key, label]) => epochSeries(records, key, label),
  );
}

/**
 * The label-free signals (label_free/mutual_nn_rate, ..., see reid_core/evaluation/label_free.py)
 * per evaluated epoch, in the order they first appear; measured with or without labels, the
 * first point at epoch 0 with eval.at_start (neighbour_stability starts at the second).
 */
export function labelFreeSeries(records) {
  const keys = [];
  for (const record of records) {
    for (const key of Object.keys(record)) {
      if (key.startsWith("label_free/") && !keys.includes(key)) keys.push(key);
    }
  }
  return keys.map((key) => epochSeries(records, key, key.slice("label_free/".length)));
}

/** Whether any series of `seriesList` has a point. */
export const hasPoints = (seriesList) => seriesList.some((s) => s.points.length > 0);

/** The points {x: epoch, y} of one history key, e.g. epochSeries(records, "eval/mAP", "mAP"). */
export function epochSeries(records, key, label) {
  const points = records
    .filter((r) => typeof r[key] === "number" && typeof r.epoch === "number")
    .map((r) => ({ x: r.epoch, y: r[key] }));
  return { label, key, points };
}

/**
 * What the x axis says of an epoch: epoch 0 is the evaluation before training (a record of
 * evaluation figures only, the first of GET v1/jobs/{id}/metrics when eval.at_start is on).
 */
export function epochLabel(epoch) {
  return epoch === 0 ? "before training" : String(epoch);
}

/** A tooltip's title: the epoch, and what epoch 0 is. */
export function epochTitle(epoch) {
  return epoch === 0 ? "epoch 0 (before training)" : `epoch ${epoch}`;
}

/**
 * A line chart in `container` (a canvas inside a fixed-height box), updated in place by
 * `update(series)`; shows `emptyText` while there is no point yet.
 */
export class EpochChart {
  constructor(container, { id, yTitle, emptyText }) {
    this.canvas = h("canvas", { id, role: "img", "aria-label": yTitle });
    this.empty = h("p", { class: "chart-empty muted" }, emptyText);
    this.box = h("div", { class: "chart-box" }, this.canvas);
    container.append(this.box, this.empty);
    this.chart = null;
    this.unavailable = typeof window.Chart !== "function";
    if (this.unavailable) this.empty.textContent = "charts unavailable: Chart.js did not load";
    this.yTitle = yTitle;
  }

  /** The chart of the loss per epoch (a job's terms, or the totals of jobs side by side). */
  static loss(container, id) {
    return new EpochChart(container, { id, yTitle: "loss", emptyText: "No finished epoch yet." });
  }

  update(seriesList) {
    const drawn = hasPoints(seriesList);
    this.box.hidden = !drawn || this.unavailable;
    this.empty.hidden = drawn && !this.unavailable;
    if (!drawn || this.unavailable) return;
    const datasets = seriesList.map((s, i) => ({
      label: s.label,
      data: s.points,
      borderColor: PALETTE[i % PALETTE.length],
      backgroundColor: PALETTE[i % PALETTE.length],
      borderWidth: s.label === "total" ? 3 : 2,
      pointRadius: s.points.length > 40 ? 0 : 3,
      tension: 0.2,
    }));
    if (this.chart === null) {
      this.chart = new window.Chart(this.canvas, {
        type: "line",
        data: { datasets },
        options: {
          animation: false,
          maintainAspectRatio: false,
          interaction: { mode: "nearest", axis: "x", intersect: false },
          scales: {
            x: {
              type: "linear",
              title: { display: true, text: "epoch" },
              ticks: { precision: 0, callback: (value) => epochLabel(value) },
            },
            y: { title: { display: true, text: this.yTitle } },
          },
          plugins: {
            legend: { position: "bottom", labels: { boxWidth: 12 } },
            tooltip: {
              callbacks: { title: (items) => (items.length ? epochTitle(items[0].parsed.x) : "") },
            },
          },
        },
      });
    } else {
      this.chart.data.datasets = datasets;
      this.chart.update();
    }
  }

  destroy() {
    if (this.chart !== null) this.chart.destroy();
    this.chart = null;
  }
}
