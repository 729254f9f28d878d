// Building DOM nodes without innerHTML: every value from the API (reasons, log lines, names)
// becomes a text node, never markup.

/**
 * h("a", {href: "#/jobs", class: "x", onclick: fn}, "text", child, [more, children])
 * Props: `class`, `text`, `dataset` (object), `on<event>` handlers, boolean attributes
 * (`true` sets, `false`/`null`/`undefined` omits), anything else as an attribute.
 * Children: nodes, strings and numbers (as text), arrays (flattened); null and false are skipped.
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "value" && "value" in el) el.value = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

/** Replaces the children of `el`, with the same rules as h() (null skipped, arrays flattened). */
export function setChildren(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

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

/** A form's status line, hidden until setMessage says how what it sent went. */
export function formMessage() {
  return h("p", { class: "form-message", role: "status", hidden: true });
}

/** A view's alert line, hidden until setMessage says what failed (a refresh, an action). */
export function alertLine(id = null) {
  return h("p", { class: "form-error", role: "alert", id, hidden: true });
}
