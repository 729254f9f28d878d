// The JSON API under v1/: the API key on every call, errors as ApiError with the API's message
// ({"error": {"code", "message", "details"}}), conditional GETs, uploads with progress, downloads
// and server-sent event streams.
//
// Paths are relative ("v1/jobs"), resolved against the page's URL, so the dashboard also works
// when a proxy serves the service under a prefix.

const KEY_STORAGE = "reid.apiKey";

export class ApiError extends Error {
  constructor(status, code, message, details = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

/** The key lives in sessionStorage: one tab, gone when the tab closes. */
export const apiKey = {
  get: () => sessionStorage.getItem(KEY_STORAGE),
  set: (key) => sessionStorage.setItem(KEY_STORAGE, key),
  clear: () => sessionStorage.removeItem(KEY_STORAGE),
};

let unauthorizedHandler = () => {};

/** `handler(error)` runs when the API refuses the key (401); the key is forgotten first. */
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

function withKey(extra) {
  const headers = new Headers(extra);
  const key = apiKey.get();
  if (key) headers.set("X-API-Key", key);
  return headers;
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON: an error page from a proxy in front of the API.
  }
  const error = body && body.error;
  if (error && typeof error.message === "string") {
    return new ApiError(response.status, error.code, error.message, error.details || null);
  }
  const text = `HTTP ${response.status} ${response.statusText}`.trim();
  return new ApiError(response.status, `http_${response.status}`, `${text} from ${response.url}`);
}

function refused(error) {
  apiKey.clear();
  unauthorizedHandler(error);
  return error;
}

/**
 * fetch() for the API: the key, JSON bodies, errors thrown as ApiError. A 304 is returned (for
 * conditional requests), never thrown. AbortError passes through untouched.
 */
export async function request(path, { method = "GET", json, body, headers, signal } = {}) {
  if (!apiKey.get()) throw refused(new ApiError(401, "no_api_key", "enter an API key"));
  const init = { method, headers: withKey(headers), signal, cache: "no-store" };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers.set("Content-Type", "application/json");
  } else if (body !== undefined) {
    init.body = body;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(
      0,
      "network_error",
      `cannot reach the API (${error.message}); is it running?`,
    );
  }
  if (response.status === 401) throw refused(await errorFrom(response));
  if (!response.ok && response.status !== 304) throw await errorFrom(response);
  return response;
}

export async function getJSON(path, options = {}) {
  return (await request(path, options)).json();
}

export async function sendJSON(method, path, json) {
  const response = await request(path, { method, json });
  return response.status === 204 ? null : response.json();
}

/**
 * A resource polled with If-None-Match: `fetch()` resolves to the new body, or to null when the
 * server answered 304 (unchanged: no body is transferred or parsed).
 */
export class ConditionalResource {
  constructor(path) {
    this.path = path;
    this.etag = null;
  }

  async fetch(signal) {
    const headers = this.etag ? { "If-None-Match": this.etag } : {};
    const response = await request(this.path, { headers, signal });
    if (response.status === 304) return null;
    this.etag = response.headers.get("ETag");
    return response.json();
  }

  /** Forget the ETag, e.g. after a change made by this page: the next fetch is a full GET. */
  reset() {
    this.etag = null;
  }
}

/**
 * POST a FormData with upload progress (fetch cannot report it): `onProgress(fraction)`.
 * Resolves to the JSON answer; rejects with ApiError.
 */
export function upload(path, formData, onProgress) {
  if (!apiKey.get())
    return Promise.reject(refused(new ApiError(401, "no_api_key", "enter an API key")));
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("X-API-Key", apiKey.get());
    xhr.responseType = "text";
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        // handled below
      }
      if (xhr.status >= 200 && xhr.status < 300 && body !== null) {
        resolve(body);
        return;
      }
      const error = body && body.error;
      const failure = error
        ? new ApiError(xhr.status, error.code, error.message, error.details || null)
        : new ApiError(xhr.status, `http_${xhr.status}`, `HTTP ${xhr.status} ${xhr.statusText}`);
      reject(xhr.status === 401 ? refused(failure) : failure);
    });
    xhr.addEventListener("error", () =>
      reject(new ApiError(0, "network_error", "the upload was interrupted (network error)")),
    );
    xhr.send(formData);
  });
}

/** GET a file with the key (a plain link cannot send it) and hand it to the browser to save. */
export async function download(path, fallbackName) {
  const response = await request(path);
  const blob = await response.blob();
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = match ? decodeURIComponent(match[1]) : fallbackName;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}

/**
 * GET `path` as server-sent events: `onOpen()` once the stream is there, then `onEvent({type,
 * data, id})` per event until the server ends it or `signal` aborts. EventSource cannot send the
 * X-API-Key header, hence fetch. When the server answers anything but text/event-stream (a route
 * that does not stream), resolves to {streamed: false, text} with the body.
 */
export async function readEventStream(path, { onOpen, onEvent, signal }) {
  const response = await request(path, { headers: { Accept: "text/event-stream" }, signal });
  const type = response.headers.get("Content-Type") || "";
  if (!type.startsWith("text/event-stream")) {
    return { streamed: false, text: await response.text() };
  }
  onOpen();
  const parser = new EventStreamParser(onEvent);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    parser.push(value);
  }
  parser.finish();
  return { streamed: true, text: "" };
}

/** The text/event-stream format (WHATWG HTML, "server-sent events"), fed in arbitrary chunks. */
export class EventStreamParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.data = [];
    this.type = "";
    this.id = "";
  }

  push(chunk) {
    this.buffer += chunk;
    // A trailing "\r" may be the first half of "\r\n": it waits for the next chunk.
    const held = this.buffer.endsWith("\r") ? "\r" : "";
    const lines = this.buffer.slice(0, this.buffer.length - held.length).split(/\r\n|\r|\n/);
    this.buffer = lines.pop() + held; // the last piece is an incomplete line (or empty)
    for (const line of lines) this.line(line);
  }

  finish() {
    // A final event without its blank line is dropped, as EventSource does.
    this.buffer = "";
  }

  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return; // a comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.type = value;
    else if (field === "id") this.id = value;
  }

  dispatch() {
    if (this.data.length > 0) {
      this.onEvent({ type: this.type || "message", data: this.data.join("\n"), id: this.id });
    }
    this.data = [];
    this.type = "";
  }
}
