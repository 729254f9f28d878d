// What the views say of errors and of what an action did: error boxes, a form's status line, a
// view's alert line, and buttons kept disabled while their request runs.

import { h, setChildren } from "./dom.js";

/** A message box for an error (an ApiError's message, or any Error's). */
export function errorBox(error, prefix = "") {
  return h("p", { class: "error-box", role: "alert" }, prefix, describeError(error));
}

/** The readable text of an error: the API's message, and any field detail it does not repeat. */
export function describeError(error) {
  if (!(error instanceof Error)) return String(error);
  const details = Array.isArray(error.details) ? error.details : [];
  const fields = details
    .filter((d) => d && d.field && !error.message.includes(d.message || d.field))
    .map((d) => `${d.field}: ${d.message}`);
  return [error.message, ...fields].join("; ");
}

/**
 * Shows `content` in `el` (a formMessage or an alertLine): a text, or an array of nodes and
 * texts (a link in a message); an empty one hides it.
 */
export function setMessage(el, content, kind = "error") {
  const empty = !content || content.length === 0;
  setChildren(el, empty ? null : content);
  el.hidden = empty;
  el.classList.toggle("form-error", kind === "error");
  el.classList.toggle("form-ok", kind === "ok");
}

/** Shows `error` in `el` (a formMessage or an alertLine), after `prefix` ("Could not ...: "). */
export function showError(el, error, prefix = "") {
  setMessage(el, prefix + describeError(error));
}

/**
 * Shows in `root`, instead of a view that could not load, the way back (`back`, its crumbs) and
 * why; nothing when the load was aborted (the view closed meanwhile).
 */
export function showLoadError(root, back, error, prefix = "") {
  if (error.name === "AbortError") return;
  setChildren(root, back, errorBox(error, prefix));
}

/** A thumbnail's frame whose image did not load: "image unavailable", and why as its tooltip. */
export function showThumbError(frame, error) {
  frame.classList.remove("loading");
  const why = describeError(error);
  setChildren(frame, h("span", { class: "thumb-error", title: why }, "image unavailable"));
}

/** A form's status line, hidden until setMessage says how what it sent went. */
export function formMessage() {
  return h("p", { class: "form-message", role: "status", hidden: true });
}

/** A view's alert line, hidden until setMessage says what failed (a refresh, an action). */
export function alertLine(id = null) {
  return h("p", { class: "form-error", role: "alert", id, hidden: true });
}

/**
 * Runs `action` with `button` disabled, then enables it again. A failure other than an abort (a
 * view closed meanwhile) is shown in `message`, after `prefix` (a text, or a function of the error
 * that gives one).
 */
export async function whileBusy(button, message, action, prefix = "") {
  button.disabled = true;
  try {
    await action();
  } catch (error) {
    if (error.name === "AbortError") return;
    showError(message, error, typeof prefix === "function" ? prefix(error) : prefix);
  } finally {
    button.disabled = false;
  }
}
