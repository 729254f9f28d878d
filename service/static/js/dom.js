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
