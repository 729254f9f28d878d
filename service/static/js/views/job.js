// #/jobs/<id>: one job: state and timeline, loss, evaluation and label-free charts, the log as
// it grows, its configuration, MLflow run and model, Cancel and Retry.
//
// The job is polled with If-None-Match; events and metrics are fetched again only when its
// state or epoch changed. The log follows the server's event stream when it has one
// (logs?follow=true answering text/event-stream), else its tail is polled.

import { ConditionalResource, getJSON, readEventStream, request, sendJSON } from "../api.js";
import { EpochChart, evalSeries, hasPoints, labelFreeSeries, lossSeries } from "../charts.js";
import { h, setChildren } from "../dom.js";
import * as fmt from "../format.js";
import {
  alertLine,
  describeError,
  setMessage,
  showError,
  showLoadError,
  whileBusy,
} from "../messages.js";
import { poll } from "../poll.js";
import {
  crumbs,
  definitionList,
  externalLink,
  jsonBlock,
  progressBar,
  stateBadge,
  timelineItems,
} from "../widgets.js";

const JOB_POLL_MS = 2000;
const LOG_POLL_MS = 3000;
const LOG_RECONNECT_MS = 3000;
const LOG_LINES = 500;

const CANCELLABLE = new Set(["QUEUED", "STARTING", "RUNNING", "RETRYING"]);
const RETRYABLE = new Set(["FAILED", "CANCELLED"]);

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });

export function renderJob(root, [jobId]) {
  const resource = new ConditionalResource(`v1/jobs/${encodeURIComponent(jobId)}`);
  const closing = new AbortController(); // aborts everything in flight when the view goes away
  let job = null;
  let dataset = null;

  const title = h("h1", {}, "Job ", h("span", { class: "mono" }, fmt.shortId(jobId)));
  const badge = h("span", { id: "job-state" });
  const cancelButton = h("button", { type: "button", id: "cancel-job", class: "danger" }, "Cancel");
  const retryButton = h("button", { type: "button", id: "retry-job" }, "Retry");
  const reason = h("p", { class: "reason muted", id: "job-reason" });
  const warnings = h("ul", { class: "notice warnings", id: "job-warnings", hidden: true });
  const progress = h("div", { class: "job-progress" });
  const status = alertLine("job-status");
  const facts = h("div", { id: "job-facts" });
  const timeline = h("ol", { class: "timeline", id: "job-timeline" });
  const lossBox = h("div", { class: "chart-card" });
  const evalBox = h("div", { class: "chart-card" });
  const labelFreeBox = h("div", { class: "chart-card" });
  const logView = h("pre", { class: "log", id: "job-log", tabindex: "0" });
  const logNote = h("span", { class: "muted", id: "log-mode" });
  const scrollToEnd = h("input", { type: "checkbox", checked: true });
  const config = h("div", { id: "job-config" });

  setChildren(root, h("p", { class: "muted" }, "Loading job…"));
  const lossChart = EpochChart.loss(lossBox, "loss-chart");
  const evalChart = new EpochChart(evalBox, {
    id: "eval-chart",
    yTitle: "%",
    emptyText:
      "No evaluation yet (before training with eval.at_start, then every eval.every_n_epochs epochs).",
  });
  const labelFreeChart = new EpochChart(labelFreeBox, {
    id: "label-free-chart",
    yTitle: "signal",
    emptyText: "No label-free signal yet.",
  });
  const evalCard = h(
    "section",
    { class: "card", id: "eval-card" },
    h("h2", {}, "Evaluation (mAP, CMC, %)"),
    evalBox,
  );
  // Shown once measured (eval.label_free, on the evaluation's schedule); on data without a
  // query/gallery split they are the only evaluation and take its place beside the losses.
  const labelFreeCard = h(
    "section",
    { class: "card", id: "label-free-card", hidden: true },
    h("h2", {}, "Label-free signals"),
    h(
      "p",
      { class: "muted chart-note" },
      "Measured on the training images without labels: mutual_nn_rate and similarity_margin " +
        "rise as views of one person find each other across cameras; neighbour_stability nears " +
        "1 as the neighbourhoods settle.",
    ),
    labelFreeBox,
  );

  function layout() {
    setChildren(
      root,
      crumbs("#/jobs", "Jobs"),
      h(
        "div",
        { class: "view-head" },
        title,
        badge,
        h("div", { class: "actions" }, cancelButton, retryButton),
      ),
      reason,
      warnings,
      progress,
      status,
      h(
        "div",
        { class: "grid-2" },
        h("section", { class: "card" }, h("h2", {}, "Summary"), facts),
        h("section", { class: "card" }, h("h2", {}, "Timeline"), timeline),
      ),
      h(
        "div",
        { class: "grid-2" },
        h("section", { class: "card" }, h("h2", {}, "Loss per term"), lossBox),
        evalCard,
        labelFreeCard,
      ),
      h(
        "section",
        { class: "card" },
        h(
          "div",
          { class: "card-head" },
          h("h2", {}, "Log"),
          logNote,
          h("label", { class: "inline" }, scrollToEnd, "scroll to the end"),
        ),
        logView,
      ),
      h("section", { class: "card" }, h("h2", {}, "Configuration"), config),
    );
  }

  // -- rendering ------------------------------------------------------------------------------

  function renderJobFacts() {
    setChildren(badge, stateBadge(job));
    reason.textContent = job.reason || "";
    renderProgress();
    cancelButton.hidden = !CANCELLABLE.has(job.state);
    retryButton.hidden = !RETRYABLE.has(job.state);
    const runId = job.mlflow_run_id;
    const run = runId
      ? externalLink(job.mlflow_run_url, runId, "mlflow-run") ||
        h("span", { class: "mono", id: "mlflow-run" }, runId)
      : fmt.DASH;
    const model = !job.model_name
      ? fmt.DASH
      : job.model_version
        ? h(
            "a",
            { href: `#/models/${encodeURIComponent(job.model_name)}`, id: "job-model" },
            `${job.model_name} v${job.model_version}`,
          )
        : h("span", { id: "job-model" }, `${job.model_name} (registered when the job succeeds)`);
    setChildren(
      warnings,
      (job.warnings || []).map((w) => h("li", {}, w)),
    );
    warnings.hidden = !(job.warnings && job.warnings.length > 0);
    const m = job.metrics || {};
    setChildren(
      facts,
      definitionList([
        ["Job id", h("span", { class: "mono" }, job.id)],
        [
          "Dataset",
          dataset
            ? h("a", { href: "#/datasets" }, dataset.name)
            : job.dataset_id
              ? fmt.shortId(job.dataset_id)
              : "(deleted)",
        ],
        ["Epoch", fmt.epochOf(job)],
        ["Step", job.step ?? fmt.DASH],
        ["Images/s", fmt.number(m.images_per_second, 1)],
        ["Created", fmt.dateTime(job.created_at)],
        ["Started", fmt.dateTime(job.started_at)],
        ["Finished", fmt.dateTime(job.finished_at)],
        ["GPUs", job.gpus],
        ["Queue · priority", `${job.queue} · ${job.priority}`],
        [
          "Restarts",
          h(
            "span",
            { title: "after the trainer or its worker was killed (the OOM killer, a lost worker)" },
            `${job.restarts} of ${job.max_restarts}`,
          ),
        ],
        [
          "Retries",
          h(
            "span",
            { title: "after the trainer crashed; a Retry of yours starts both counts again" },
            `${job.retries} of ${job.max_retries}`,
          ),
        ],
        ["Timeout", fmt.duration(job.timeout_minutes * 60)],
        ["Worker", job.worker_id || fmt.DASH],
        ["MLflow run", run],
        ["Model", model],
      ]),
    );
    setChildren(
      config,
      h("h3", {}, "Overrides"),
      jsonBlock(job.config_overrides, "job-overrides"),
      h(
        "details",
        { open: true },
        h("summary", {}, "Resolved configuration"),
        jsonBlock(job.resolved_config, "job-resolved-config"),
      ),
    );
  }

  function renderProgress() {
    setChildren(progress, progressBar(job), h("span", { class: "muted" }, fmt.timing(job)));
  }

  function renderEvents(events) {
    setChildren(timeline, ...timelineItems(events));
  }

  function renderMetrics(records) {
    const evaluation = evalSeries(records);
    const labelFree = labelFreeSeries(records);
    // unhide first: a chart drawn in a hidden card would have no size
    labelFreeCard.hidden = !hasPoints(labelFree);
    evalCard.hidden = hasPoints(labelFree) && !hasPoints(evaluation);
    lossChart.update(lossSeries(records));
    evalChart.update(evaluation);
    labelFreeChart.update(labelFree);
  }

  // -- data -----------------------------------------------------------------------------------

  const base = `v1/jobs/${encodeURIComponent(jobId)}`;

  async function apply(next) {
    const previous = job;
    job = next;
    if (previous === null) {
      if (job.dataset_id)
        dataset = await getJSON(`v1/datasets/${job.dataset_id}`).catch(() => null);
      layout();
    }
    renderJobFacts();
    const stateChanged = previous === null || previous.state !== job.state;
    const epochChanged = previous === null || previous.epoch !== job.epoch;
    // the evaluation before training (epoch 0) comes while the job's epoch is still 0
    const evaluated =
      previous === null || fmt.latestEval(previous).epoch !== fmt.latestEval(job).epoch;
    const loads = [];
    if (stateChanged)
      loads.push(getJSON(`${base}/events`, { signal: closing.signal }).then(renderEvents));
    if (stateChanged || epochChanged || evaluated) {
      loads.push(getJSON(`${base}/metrics`, { signal: closing.signal }).then(renderMetrics));
    }
    if (stateChanged) logs.jobChanged();
    await Promise.all(loads);
  }

  async function refresh() {
    if (job !== null && fmt.isFinal(job)) return; // a finished job changes only by our Retry
    const next = await resource.fetch(closing.signal);
    if (next !== null) await apply(next);
    else renderProgress(); // unchanged (304), but the running time moves on
    setMessage(status, "");
  }

  async function act(button, path, verb) {
    setMessage(status, "");
    const send = async () => {
      const next = await sendJSON("POST", path);
      resource.reset();
      await apply(next);
    };
    await whileBusy(button, status, send, `Could not ${verb} the job: `);
  }

  cancelButton.addEventListener("click", () => {
    if (
      window.confirm(`Cancel job ${fmt.shortId(jobId)}? A running trainer checkpoints and stops.`)
    ) {
      act(cancelButton, `${base}/cancel`, "cancel");
    }
  });
  retryButton.addEventListener("click", () => act(retryButton, `${base}/retry`, "retry"));

  // -- log ------------------------------------------------------------------------------------

  const logs = {
    running: false,
    stream: null, // AbortController of the open stream

    show(text) {
      const lines = text.split("\n");
      logView.textContent = lines.slice(-LOG_LINES).join("\n");
      this.scroll();
    },

    append(text) {
      logView.append(`${logView.childNodes.length > 0 ? "\n" : ""}${text}`);
      while (logView.childNodes.length > LOG_LINES) logView.firstChild.remove();
      this.scroll();
    },

    scroll() {
      if (scrollToEnd.checked) logView.scrollTop = logView.scrollHeight;
    },

    async tail() {
      const response = await request(`${base}/logs?tail=${LOG_LINES}`, { signal: closing.signal });
      this.show(await response.text());
    },

    /** Called when the job's state changed: (re)start following, or read the final tail. */
    jobChanged() {
      if (fmt.isFinal(job)) {
        if (this.stream) this.stream.abort();
        logNote.textContent = "";
        this.tail().catch((error) => {
          logNote.textContent = `(log unavailable: ${describeError(error)})`;
        });
      } else if (!this.running) {
        this.follow();
      }
    },

    async follow() {
      this.running = true;
      try {
        while (!closing.signal.aborted && !fmt.isFinal(job)) {
          this.stream = new AbortController();
          const signal = AbortSignal.any([closing.signal, this.stream.signal]);
          try {
            const result = await readEventStream(`${base}/logs?tail=${LOG_LINES}&follow=true`, {
              onOpen: () => {
                logView.textContent = ""; // each connection starts with the tail
                logNote.textContent = "(live)";
              },
              onEvent: (event) => {
                if (event.type === "message") this.append(event.data);
                else if (event.type === "end") jobPoll.now(); // the job finished: show it now
              },
              signal,
            });
            if (!result.streamed) {
              logNote.textContent = "(refreshed every few seconds)";
              this.show(result.text);
              await this.pollTail();
              return;
            }
            logNote.textContent = "(reconnecting…)";
          } catch (error) {
            if (error.name === "AbortError") continue;
            logNote.textContent = `(log unavailable: ${describeError(error)})`;
          }
          await sleep(LOG_RECONNECT_MS, closing.signal);
        }
      } finally {
        this.running = false;
      }
    },

    async pollTail() {
      while (!closing.signal.aborted && !fmt.isFinal(job)) {
        await sleep(LOG_POLL_MS, closing.signal);
        if (closing.signal.aborted || fmt.isFinal(job)) return; // jobChanged read the last tail
        try {
          await this.tail();
        } catch (error) {
          if (error.name !== "AbortError")
            logNote.textContent = `(log unavailable: ${describeError(error)})`;
        }
      }
    },
  };

  // -- start ----------------------------------------------------------------------------------

  const jobPoll = poll(refresh, JOB_POLL_MS, (error) => {
    if (job !== null) {
      showError(status, error, "Could not refresh the job: ");
      return;
    }
    jobPoll.stop(); // e.g. 404: not a job of this key's owner
    showLoadError(root, crumbs("#/jobs", "Jobs"), error);
  });
  jobPoll.now();

  return () => {
    jobPoll.stop();
    closing.abort();
    lossChart.destroy();
    evalChart.destroy();
    labelFreeChart.destroy();
  };
}
