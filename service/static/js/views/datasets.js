// #/datasets: register a server folder (JSON {name, path}) or upload an archive (multipart name +
// file), see what the scan found, delete.

import { getJSON, request, sendJSON, upload } from "../api.js";
import { h, setChildren } from "../dom.js";
import * as fmt from "../format.js";
import { alertLine, formMessage, setMessage, showError, whileBusy } from "../messages.js";
import { definitionList } from "../widgets.js";

const MAX_PAGE = 200;
const NAME_PATTERN = "[A-Za-z0-9][A-Za-z0-9._\\-]{0,127}"; // service.schemas.DATASET_NAME_PATTERN

export function renderDatasets(root) {
  const tbody = h("tbody");
  const status = alertLine();
  const empty = h(
    "p",
    { class: "muted", hidden: true },
    "No dataset yet: register a folder or upload an archive.",
  );
  const scan = h("section", { class: "card", id: "dataset-scan", hidden: true });
  let closed = false;

  setChildren(
    root,
    h("div", { class: "view-head" }, h("h1", {}, "Datasets")),
    h("div", { class: "grid-2" }, pathForm(showRegistered), uploadForm(showRegistered)),
    scan,
    status,
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "data", id: "datasets-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            h("th", {}, "Name"),
            h("th", {}, "Format"),
            h("th", { class: "num" }, "Images"),
            h("th", { class: "num optional" }, "Identities"),
            h("th", { class: "num optional" }, "Cameras"),
            h("th", { class: "num optional" }, "Unreadable"),
            h("th", { class: "optional" }, "Registered"),
            h("th", {}, ""),
          ),
        ),
        tbody,
      ),
    ),
    empty,
  );

  function showRegistered(dataset) {
    showScan(dataset);
    load();
  }

  function showScan(dataset) {
    const splits = Object.entries(dataset.splits || {});
    setChildren(
      scan,
      h("h2", {}, `Scan of ${dataset.name}`),
      definitionList([
        ["Format", dataset.format],
        [
          "Source",
          dataset.kind === "upload"
            ? `upload (${fmt.bytes(dataset.size_bytes)} extracted)`
            : "server folder",
        ],
        ["Folder", h("span", { class: "mono" }, dataset.path)],
        ["Images", dataset.image_count],
        ["Identities", dataset.identity_count],
        ["Cameras", dataset.camera_count],
        ["Unreadable files", dataset.unreadable_count],
      ]),
      splits.length > 0
        ? h(
            "table",
            { class: "data compact" },
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                ["Split", "Images", "Identities", "Cameras"].map((t) => h("th", {}, t)),
              ),
            ),
            h(
              "tbody",
              {},
              splits.map(([name, s]) =>
                h(
                  "tr",
                  {},
                  h("td", {}, name),
                  h("td", { class: "num" }, s.images),
                  h("td", { class: "num" }, s.identities),
                  h("td", { class: "num" }, s.cameras),
                ),
              ),
            ),
          )
        : null,
      dataset.unreadable_sample.length > 0
        ? h(
            "details",
            {},
            h("summary", {}, `Some unreadable files (${dataset.unreadable_count})`),
            h(
              "ul",
              { class: "mono" },
              dataset.unreadable_sample.map((f) => h("li", {}, f)),
            ),
          )
        : null,
    );
    scan.dataset.id = dataset.id;
    scan.hidden = false;
  }

  async function remove(dataset, button) {
    if (
      !window.confirm(
        `Delete dataset ${dataset.name}? An uploaded archive's files are deleted too.`,
      )
    )
      return;
    button.disabled = true;
    try {
      await request(`v1/datasets/${dataset.id}`, { method: "DELETE" });
      if (scan.dataset.id === dataset.id) scan.hidden = true;
      await load();
    } catch (error) {
      showError(status, error, `Could not delete ${dataset.name}: `);
      button.disabled = false;
    }
  }

  async function load() {
    try {
      const page = await getJSON(`v1/datasets?limit=${MAX_PAGE}`);
      if (closed) return;
      setChildren(
        tbody,
        ...page.items.map((d) => {
          const del = h("button", { type: "button", class: "link-button danger" }, "delete");
          del.addEventListener("click", () => remove(d, del));
          return h(
            "tr",
            { dataset: { datasetId: d.id } },
            h(
              "td",
              {},
              h(
                "button",
                { type: "button", class: "link-button", onclick: () => showScan(d) },
                d.name,
              ),
            ),
            h("td", {}, d.format),
            h("td", { class: "num" }, d.image_count),
            h("td", { class: "num optional" }, d.identity_count),
            h("td", { class: "num optional" }, d.camera_count),
            h("td", { class: "num optional" }, d.unreadable_count),
            h("td", { class: "optional" }, fmt.dateTime(d.created_at)),
            h("td", {}, del),
          );
        }),
      );
      empty.hidden = page.items.length > 0;
      setMessage(status, "");
    } catch (error) {
      showError(status, error, "Could not load the datasets: ");
    }
  }

  load();
  return () => {
    closed = true;
  };
}

function nameInput() {
  return h("input", {
    name: "name",
    required: true,
    pattern: NAME_PATTERN,
    title: "letters, digits, '.', '_' or '-'; starts with a letter or digit; at most 128",
    autocomplete: "off",
  });
}

/** Checks the inputs the browser can check; says which one is wrong in `message`. */
function valid(form, message) {
  const bad = [...form.elements].find((el) => el.willValidate && !el.checkValidity());
  if (bad === undefined) return true;
  setMessage(message, `${bad.name}: ${bad.validationMessage}${bad.title ? ` (${bad.title})` : ""}`);
  return false;
}

/**
 * A card form that registers a dataset under the name typed in its first field, `fields` being
 * the others ([label, input] pairs). On submit the inputs are checked, then `send(name, message)`
 * posts them and answers the dataset, which is said in `message` and handed to `onRegistered`.
 */
function registerForm({ id, title, hint, fields, submitText, extra = [], send, onRegistered }) {
  const name = nameInput();
  const message = formMessage();
  const submit = h("button", { type: "submit", class: "primary" }, submitText);
  const form = h(
    "form",
    { class: "card stack", id, novalidate: true },
    h("h2", {}, title),
    h("p", { class: "muted" }, hint),
    h("label", {}, "Name", name),
    fields.map(([label, input]) => h("label", {}, label, input)),
    h("div", { class: "actions" }, submit, extra),
    message,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    setMessage(message, "");
    if (!valid(form, message)) return;
    await whileBusy(submit, message, async () => {
      const dataset = await send(name.value.trim(), message);
      setMessage(message, `Registered ${dataset.name}: ${dataset.image_count} images.`, "ok");
      form.reset();
      onRegistered(dataset);
    });
  });
  return form;
}

function pathForm(onRegistered) {
  const path = h("input", {
    name: "path",
    required: true,
    placeholder: "/data/reid/cams-2024",
    autocomplete: "off",
  });
  return registerForm({
    id: "dataset-path-form",
    title: "Register a server folder",
    hint: "A folder under one of the service's dataset roots (REID_DATASET_ROOTS).",
    fields: [["Path on the server", path]],
    submitText: "Register folder",
    onRegistered,
    send(name, message) {
      setMessage(message, "Scanning the folder…", "ok");
      return sendJSON("POST", "v1/datasets", { name, path: path.value.trim() });
    },
  });
}

function uploadForm(onRegistered) {
  const file = h("input", {
    name: "file",
    type: "file",
    required: true,
    accept:
      ".zip,.tar,.tgz,.tar.gz,.tar.bz2,.tar.xz,application/zip,application/gzip,application/x-tar",
  });
  const bar = h("progress", {
    max: "1",
    value: "0",
    hidden: true,
    "aria-label": "upload progress",
  });
  return registerForm({
    id: "dataset-upload-form",
    title: "Upload an archive",
    hint: "A .zip or .tar.gz of a Market-1501 folder or of plain crops; it is checked before extraction.",
    fields: [["Archive", file]],
    submitText: "Upload",
    extra: [bar],
    onRegistered,
    async send(name, message) {
      const body = new FormData();
      body.append("name", name);
      body.append("file", file.files[0]);
      bar.hidden = false;
      bar.value = 0;
      try {
        return await upload("v1/datasets", body, (fraction) => {
          bar.value = fraction;
          if (fraction >= 1) setMessage(message, "Uploaded; extracting and scanning…", "ok");
        });
      } finally {
        bar.hidden = true;
      }
    },
  });
}
