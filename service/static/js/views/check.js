// #/checks/<id>: a person judges pairs of a gallery's crops (does the candidate show the person
// of the query?), and after `min_answers` answers the page shows the model version's precision
// at ranks 1 and 5 with their 95% intervals, as the API estimates them (service/core/pair_checks.py).
//
// Keys: s same, d different, u unsure, z undo (the last answer given on this page), n skip (the
// next unanswered pair; the skipped one comes back after the others). An answer belongs to the
// two images: every pair of the check showing them is answered with it.

import { getJSON, request } from "../api.js";
import { h, setChildren } from "../dom.js";
import * as fmt from "../format.js";
import { alertLine, setMessage, showError, showLoadError, showThumbError } from "../messages.js";
import { crumbs } from "../widgets.js";
import { cameraLabel } from "./galleries.js";

const ANSWERS = [
  { value: "same", key: "s", label: "Same" },
  { value: "different", key: "d", label: "Different" },
  { value: "unsure", key: "u", label: "Unsure" },
];
const UNDO_KEY = "z";
const SKIP_KEY = "n";

const checkPath = (id) => `v1/checks/${encodeURIComponent(id)}`;
const imagePath = (galleryId, position) =>
  `v1/galleries/${encodeURIComponent(galleryId)}/images/${position}`;
/** The two images of a pair, unordered: what an answer belongs to. */
const imagesOf = (pair) => [pair.query.path, pair.candidate.path].sort().join("\n");

/** "70% (95% interval 40–89%)", or a dash before any same/different answer. */
function precisionText(precision) {
  if (precision.estimate === null) return fmt.DASH;
  const interval = `${fmt.percent(precision.low)}–${fmt.percent(precision.high)}`;
  return `${fmt.percent(precision.estimate)} (95% interval ${interval})`;
}

function precisionCounts(precision) {
  return `${precision.same} same, ${precision.different} different, ${precision.unsure} unsure`;
}

export function renderCheck(root, [checkId]) {
  const closing = new AbortController(); // aborts the images in flight when the view goes
  const images = new Map(); // gallery position -> Promise of an object URL
  const given = []; // pair indices answered on this page, newest last: what undo takes back
  let check = null;
  let pairs = [];
  let current = null; // the index of the pair shown; null when every pair is answered
  let busy = false;

  const title = h("h1", {}, "Pair check");
  const progress = h("p", { id: "check-progress", class: "check-progress" });
  const status = alertLine("check-status");
  const note = h("p", { class: "muted", id: "check-note", hidden: true });
  const pairCard = h("section", { class: "card", id: "check-pair" });
  const estimate = h("section", { class: "card", id: "check-estimate" });
  const buttons = ANSWERS.map(({ value, key, label }) =>
    h(
      "button",
      {
        type: "button",
        class: `answer answer-${value}`,
        id: `answer-${value}`,
        "aria-keyshortcuts": key,
        onclick: () => answer(value),
      },
      label,
      h("kbd", {}, key),
    ),
  );
  const undoButton = h(
    "button",
    { type: "button", id: "undo-answer", "aria-keyshortcuts": UNDO_KEY, onclick: () => undo() },
    "Undo",
    h("kbd", {}, UNDO_KEY),
  );
  const skipButton = h(
    "button",
    { type: "button", id: "skip-pair", "aria-keyshortcuts": SKIP_KEY, onclick: () => skip() },
    "Skip",
    h("kbd", {}, SKIP_KEY),
  );

  setChildren(root, h("p", { class: "muted" }, "Loading the check…"));

  function layout() {
    setChildren(
      root,
      crumbs(`#/galleries/${check.gallery_id}`, "Gallery"),
      h("div", { class: "view-head" }, title),
      h(
        "p",
        { class: "muted" },
        "Does the right crop show the person of the left one? The pairs are sampled so that " +
          "the answers estimate the model's precision without bias; answer what you see, and " +
          "Unsure when you cannot tell (left out of the estimate).",
      ),
      progress,
      status,
      note,
      pairCard,
      estimate,
    );
  }

  function image(position) {
    if (!images.has(position)) {
      const url = request(imagePath(check.gallery_id, position), { signal: closing.signal })
        .then((response) => response.blob())
        .then((blob) => URL.createObjectURL(blob));
      url.catch(() => images.delete(position)); // fetched again next time
      images.set(position, url);
    }
    return images.get(position);
  }

  function figure(role, crop) {
    const img = h("img", { class: "thumb", alt: `${role} crop ${crop.path}` });
    const frame = h("div", { class: "thumb-frame loading" }, img);
    image(crop.position)
      .then((url) => {
        img.src = url;
        frame.classList.remove("loading");
      })
      .catch((error) => {
        if (error.name !== "AbortError") showThumbError(frame, error);
      });
    return h(
      "figure",
      { class: "pair-crop", id: `pair-${role}`, dataset: { position: crop.position } },
      frame,
      h(
        "figcaption",
        {},
        h("span", { class: "muted" }, `${role} `),
        h("span", { class: "chip" }, cameraLabel(crop.camera_id)),
        h("div", { class: "hit-path mono muted", title: crop.path }, crop.path),
      ),
    );
  }

  function renderProgress() {
    const answered = pairs.filter((p) => p.answer !== null).length;
    progress.textContent = `${answered} of ${pairs.length} pairs answered`;
  }

  function renderPair() {
    undoButton.disabled = busy || given.length === 0;
    for (const button of [...buttons, skipButton]) button.disabled = busy || current === null;
    const actions = h("div", { class: "actions answer-actions" }, buttons, skipButton, undoButton);
    if (current === null) {
      setChildren(
        pairCard,
        h("h2", {}, "Every pair is answered"),
        h(
          "p",
          { id: "check-done" },
          "Thank you. A retrained version's check of this dataset will ask again only about " +
            "the pairs it proposes that you have not judged.",
        ),
        actions,
      );
      return;
    }
    const pair = pairs[current];
    setChildren(
      pairCard,
      h("h2", {}, `Pair ${current + 1} of ${pairs.length}`),
      h(
        "div",
        { class: "pair", dataset: { index: pair.index } },
        figure("query", pair.query),
        figure("candidate", pair.candidate),
      ),
      h(
        "p",
        { class: "muted pair-facts" },
        `The candidate is the query's crop number ${pair.rank} from another camera ` +
          `(similarity ${fmt.number(pair.score, 3)}).`,
      ),
      actions,
    );
  }

  function renderEstimate() {
    const ready = check.answered >= check.min_answers;
    if (!ready) {
      setChildren(
        estimate,
        h("h2", {}, "Estimate"),
        h(
          "p",
          { class: "muted", id: "estimate-pending" },
          `The estimate shows after ${check.min_answers} answers (${check.answered} so far).`,
        ),
      );
      return;
    }
    const row = (id, label, precision) =>
      h(
        "tr",
        { id },
        h("th", {}, label),
        h("td", { class: "precision" }, precisionText(precision)),
        h("td", { class: "num" }, precision.answers),
        h("td", { class: "muted" }, precisionCounts(precision)),
      );
    setChildren(
      estimate,
      h("h2", {}, "Estimate"),
      h(
        "table",
        { class: "data compact", id: "estimate-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            h("th", {}, ""),
            h("th", {}, "Estimate"),
            h("th", { class: "num" }, "Answers"),
            h("th", {}, ""),
          ),
        ),
        h(
          "tbody",
          {},
          row("precision-at-1", "Precision at rank 1", check.precision_at_1),
          row("precision-at-5", "Precision at rank 5", check.precision_at_5),
        ),
      ),
      h(
        "p",
        { class: "muted" },
        `From ${check.answered} answered pairs of ${check.pairs}; logged to the version's ` +
          "MLflow run as human/precision_at_1 and human/precision_at_5.",
      ),
    );
  }

  function render() {
    setChildren(
      title,
      "Pair check ",
      h("span", { class: "muted" }, `${check.model_name} v${check.model_version}`),
    );
    renderProgress();
    renderPair();
    renderEstimate();
  }

  /** The first unanswered pair from `start` on, wrapping around; null when none is left. */
  function nextUnanswered(start) {
    for (let step = 0; step < pairs.length; step += 1) {
      const index = (start + step) % pairs.length;
      if (pairs[index].answer === null) return index;
    }
    return null;
  }

  /** Sets the answer on every pair of the same two images, as the API keeps it. */
  function setAnswer(pair, value) {
    const images = imagesOf(pair);
    for (const other of pairs) if (imagesOf(other) === images) other.answer = value;
  }

  function showOutcome(answered) {
    const { mlflow_error: mlflowError, ...fresh } = answered;
    check = fresh;
    setMessage(status, "");
    note.hidden = !mlflowError;
    note.textContent = mlflowError
      ? `Answer saved; the estimate did not reach MLflow (${mlflowError}). It is logged again ` +
        "with the next answer."
      : "";
  }

  async function send(method, index, json) {
    busy = true;
    renderPair();
    try {
      const response = await request(`${checkPath(checkId)}/pairs/${index}/answer`, {
        method,
        json,
        signal: closing.signal,
      });
      return await response.json();
    } finally {
      busy = false;
    }
  }

  async function answer(value) {
    if (busy || current === null) return;
    const pair = pairs[current];
    try {
      const answered = await send("PUT", pair.index, { answer: value });
      setAnswer(pair, value);
      given.push(pair.index);
      showOutcome(answered);
      current = nextUnanswered(pair.index + 1);
    } catch (error) {
      if (error.name === "AbortError") return;
      showError(status, error, "The answer was not saved: ");
    }
    render();
  }

  async function undo() {
    if (busy || given.length === 0) return;
    const index = given[given.length - 1];
    try {
      const answered = await send("DELETE", index);
      given.pop();
      setAnswer(pairs[index], null);
      showOutcome(answered);
      current = index;
    } catch (error) {
      if (error.name === "AbortError") return;
      showError(status, error, "The answer was not taken back: ");
    }
    render();
  }

  function skip() {
    if (busy || current === null) return;
    current = nextUnanswered(current + 1);
    renderPair();
  }

  const byKey = new Map([
    ...ANSWERS.map(({ value, key }) => [key, () => answer(value)]),
    [UNDO_KEY, undo],
    [SKIP_KEY, skip],
  ]);

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    if (event.target instanceof Element && event.target.closest("input, textarea, select")) return;
    if (document.querySelector("dialog[open]")) return; // the API key dialog
    const action = byKey.get(event.key.toLowerCase());
    if (!action || check === null) return;
    event.preventDefault();
    action();
  }

  Promise.all([
    getJSON(checkPath(checkId), { signal: closing.signal }),
    getJSON(`${checkPath(checkId)}/pairs`, { signal: closing.signal }),
  ])
    .then(([shown, list]) => {
      check = shown;
      pairs = list.items;
      current = nextUnanswered(0);
      layout();
      render();
      document.addEventListener("keydown", onKey);
    })
    .catch((error) => {
      const back = crumbs("#/galleries", "Galleries");
      showLoadError(root, back, error, `Could not load check ${checkId}: `);
    });

  return () => {
    closing.abort();
    document.removeEventListener("keydown", onKey);
    for (const url of images.values())
      url.then(
        (u) => URL.revokeObjectURL(u),
        () => {},
      );
  };
}
