// Talking to the balancer: the management and inference services, with their API
// keys (kept in sessionStorage: this browser tab's session only), server-sent events
// read through fetch (EventSource cannot send an Authorization header) and NDJSON.

const KEYS_ITEM = "paddler.api_keys";
const MAX_EVENT_CHARS = 8 * 1024 * 1024;
const MAX_LINE_CHARS = 8 * 1024 * 1024;

export class HttpError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field || null;
  }
}

let config = null;

export function setConfig(value) {
  config = value;
}

export function getConfig() {
  return config;
}

export function storedKeys() {
  try {
    const value = JSON.parse(sessionStorage.getItem(KEYS_ITEM) || "{}");
    return value && typeof value === "object" ? value : {};
  } catch {
    return {};
  }
}

export function storeKeys(keys) {
  sessionStorage.setItem(KEYS_ITEM, JSON.stringify(keys));
}

export function forgetKeys() {
  sessionStorage.removeItem(KEYS_ITEM);
}

/** The services whose key is required and not known yet. */
export function missingKeys() {
  const keys = storedKeys();
  return ["management", "inference"].filter((name) => config.api_keys[name] && !keys[name]);
}

function headers(service, extra = {}) {
  const key = storedKeys()[service];
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

const listeners = new Set();

/** fn(service) is called when a service answers 401: its key is wrong or gone. */
export function onUnauthorized(fn) {
  listeners.add(fn);
}

async function failure(response, service) {
  let message = `${response.status} ${response.statusText}`;
  let field = null;
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") message = body.error;
    if (body && typeof body.field === "string") field = body.field;
  } catch {
    // not JSON: the status says it
  }
  if (response.status === 401) for (const fn of listeners) fn(service);
  return new HttpError(response.status, message, field);
}

export function url(service, path) {
  return `${config.urls[service]}${path}`;
}

/** A JSON request to a service; the parsed answer (null for 204). */
export async function request(service, path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, cache: "no-store", headers: headers(service) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(url(service, path), init);
  if (!response.ok) throw await failure(response, service);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

async function* lines(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let start = 0;
      let end;
      while ((end = buffer.indexOf("\n", start)) >= 0) {
        yield buffer.slice(start, end).replace(/\r$/, "");
        start = end + 1;
      }
      buffer = buffer.slice(start);
      if (buffer.length > MAX_LINE_CHARS) throw new Error("a line of the stream is too long");
    }
    if (buffer) yield buffer;
  } finally {
    reader.releaseLock();
  }
}

/** Each event of a server-sent event stream, parsed as JSON: onEvent(value). */
export async function readEvents(service, path, onEvent, signal) {
  const response = await fetch(url(service, path), {
    headers: headers(service, { Accept: "text/event-stream" }),
    cache: "no-store",
    signal,
  });
  if (!response.ok) throw await failure(response, service);
  let data = [];
  let size = 0;
  for await (const line of lines(response)) {
    if (line === "") {
      if (data.length) onEvent(JSON.parse(data.join("\n")));
      data = [];
      size = 0;
    } else if (line.startsWith("data:")) {
      const value = line.slice(line.startsWith("data: ") ? 6 : 5);
      size += value.length;
      if (size > MAX_EVENT_CHARS) throw new Error("an event of the stream is too large");
      data.push(value);
    }
  }
}

/** Each line of an NDJSON answer to a POST, parsed: onMessage(value). */
export async function postNdjson(service, path, body, onMessage, signal) {
  const response = await fetch(url(service, path), {
    method: "POST",
    headers: headers(service, { "Content-Type": "application/json" }),
    body: JSON.stringify(body),
    cache: "no-store",
    signal,
  });
  if (!response.ok) throw await failure(response, service);
  for await (const line of lines(response)) {
    if (line.trim()) onMessage(JSON.parse(line));
  }
}

/**
 * Keep an event stream open while the view lives: reconnect after a failure (1 s,
 * doubling to 8 s). onState("live" | "reconnecting", error) tells the view.
 */
export function liveEvents(service, path, onEvent, onState, signal) {
  (async () => {
    let delay = 1000;
    while (!signal.aborted) {
      try {
        await readEvents(
          service,
          path,
          (value) => {
            delay = 1000;
            onState("live", null);
            onEvent(value);
          },
          signal,
        );
        if (signal.aborted) return;
        onState("reconnecting", new Error("the stream ended"));
      } catch (error) {
        if (signal.aborted) return;
        onState("reconnecting", error);
        if (error instanceof HttpError && error.status === 401) return;
      }
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 8000);
    }
  })();
}

/** A WebSocket to the inference service, offering the key as a subprotocol. */
export function inferenceSocket() {
  const key = storedKeys().inference;
  const protocols = key ? ["paddler", `paddler.bearer.${key}`] : ["paddler"];
  return new WebSocket(url("inference_socket", "/api/v1/inference_socket"), protocols);
}

/** Whether the inference service takes key: a WebSocket handshake (no request made). */
export function checkInferenceKey(key) {
  return new Promise((resolve) => {
    let socket;
    try {
      socket = new WebSocket(url("inference_socket", "/api/v1/inference_socket"), [
        "paddler",
        `paddler.bearer.${key}`,
      ]);
    } catch {
      resolve(false);
      return;
    }
    const timer = setTimeout(() => {
      socket.close();
      resolve(false);
    }, 10000);
    socket.onopen = () => {
      clearTimeout(timer);
      socket.close();
      resolve(true);
    };
    socket.onerror = () => {
      clearTimeout(timer);
      resolve(false);
    };
  });
}
