// The prompt playground: a conversation (or a raw prompt) over the inference
// WebSocket, streamed as it generates, with a stop button that cancels the request;
// an embeddings mode when the desired state enables them.

import { inferenceSocket, postNdjson, request } from "./api.js";
import { fill, formatNumber, formatSeconds, h } from "./dom.js";

const MAX_REPLY_CHARS = 2 * 1024 * 1024;
const FLUSH_MS = 60; // pieces are added to the page at most this often (one text node each)
const MAX_DOCUMENTS = 64;

let counter = 0;

function requestId() {
  counter += 1;
  return `playground-${counter}-${Math.random().toString(36).slice(2, 8)}`;
}

function optionalNumber(input) {
  const text = input.value.trim();
  return text === "" ? undefined : Number(text);
}

/** The inference socket, opened when needed; messages routed by request id. */
class Socket {
  constructor(onClosed) {
    this.handlers = new Map();
    this.socket = null;
    this.opening = null;
    this.onClosed = onClosed;
  }

  open() {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) return Promise.resolve(this.socket);
    if (this.opening) return this.opening;
    this.opening = new Promise((resolve, reject) => {
      const socket = inferenceSocket();
      socket.onopen = () => {
        this.socket = socket;
        this.opening = null;
        resolve(socket);
      };
      socket.onerror = () => {
        this.opening = null;
        reject(new Error("cannot open the inference WebSocket (is the inference key right?)"));
      };
      socket.onclose = () => {
        this.socket = null;
        for (const handler of this.handlers.values()) handler.closed();
        this.handlers.clear();
        this.onClosed();
      };
      socket.onmessage = (event) => this.dispatch(event.data);
    });
    return this.opening;
  }

  dispatch(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    const envelope = message.Response || message.Error;
    if (!envelope) return;
    const handler = this.handlers.get(envelope.request_id);
    if (handler) handler.message(message);
  }

  async send(id, variant, body, handler) {
    const socket = await this.open();
    this.handlers.set(id, handler);
    socket.send(JSON.stringify({ Request: { id, request: { [variant]: body } } }));
  }

  stop(id) {
    this.handlers.delete(id);
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify({ Notification: { StopRespondingTo: id } }));
    }
  }

  finished(id) {
    this.handlers.delete(id);
  }

  close() {
    if (this.socket) this.socket.close();
  }
}

/** One reply being generated: its text, its figures, and how it ended. */
function replyView(role) {
  const text = h("div", { class: "text", "data-test": "reply-text" });
  const reasoning = h("div", { class: "reasoning", hidden: true });
  const meta = h("div", { class: "meta", "data-test": "reply-meta" }, "waiting for a slot…");
  const element = h("div", { class: `message ${role}`, "data-test": "reply" },
    h("div", { class: "role" }, role === "raw" ? "completion" : "assistant"), reasoning, text, meta);
  return { element, text, reasoning, meta };
}

export function mountPlayground(root, { setStatus }) {
  const controller = new AbortController();
  let conversation = [];
  let running = null; // {id, view, ...}
  let embeddingsEnabled = false;
  const socket = new Socket(() => {
    if (running) finish("the WebSocket closed");
  });

  const mode = h("select", { "aria-label": "mode", "data-test": "mode" },
    h("option", { value: "chat" }, "Conversation"),
    h("option", { value: "raw" }, "Raw prompt"),
    h("option", { value: "embeddings", disabled: true }, "Embeddings (off in the desired state)"));
  const maxTokens = h("input", { type: "number", min: "1", max: "1000000", value: "256",
    class: "narrow", "aria-label": "max tokens" });
  const temperature = h("input", { type: "number", min: "0", max: "100", step: "any",
    placeholder: "desired state's", class: "narrow", "aria-label": "temperature" });
  const seed = h("input", { type: "number", min: "0", step: "1", placeholder: "none",
    class: "narrow", "aria-label": "seed" });
  const thinking = h("input", { type: "checkbox", "aria-label": "thinking" });
  const normalization = h("select", { "aria-label": "normalization" },
    ["L2", "None"].map((value) => h("option", { value }, value)));
  const prompt = h("textarea", { rows: 4, placeholder: "Say hello.", "aria-label": "prompt",
    "data-test": "prompt" });
  const send = h("button", { type: "submit", "data-test": "send" }, "Send");
  const stop = h("button", { type: "button", class: "danger", hidden: true, "data-test": "stop" }, "Stop");
  const clear = h("button", { type: "button", class: "secondary" }, "New conversation");
  const transcript = h("div", { class: "transcript", "data-test": "transcript" });
  const note = h("p", { class: "muted small" });
  const chatOnly = h("label", {}, thinking, " Thinking");
  const embeddingOnly = h("label", { hidden: true }, "Normalization ", normalization);
  const generationOnly = [
    h("label", {}, "Max tokens ", maxTokens),
    h("label", {}, "Temperature ", temperature),
    h("label", {}, "Seed ", seed),
  ];

  function showMode() {
    const value = mode.value;
    chatOnly.hidden = value !== "chat";
    embeddingOnly.hidden = value !== "embeddings";
    for (const label of generationOnly) label.hidden = value === "embeddings";
    clear.hidden = value !== "chat";
    note.textContent = {
      chat: "A conversation rendered with the model's chat template; each reply is streamed over the inference WebSocket.",
      raw: "The prompt goes to the model as it is, no chat template.",
      embeddings: "One document per line; each is embedded by one of the agents.",
    }[value];
    prompt.placeholder = value === "embeddings" ? "One document per line" : "Say hello.";
  }
  mode.addEventListener("change", showMode);

  function flush(current) {
    clearTimeout(current.timer);
    current.timer = null;
    for (const part of ["text", "reasoning"]) {
      const pending = current.pending[part];
      if (!pending) continue;
      current.pending[part] = "";
      const target = current.view[part];
      target.hidden = false;
      if (current.chars + pending.length <= MAX_REPLY_CHARS) {
        target.append(pending);
        current.chars += pending.length;
      }
    }
    if (running === current) current.view.meta.textContent = `${figures(current)} · generating…`;
    follow();
  }

  function finish(reason) {
    if (!running) return;
    const current = running;
    flush(current);
    running = null;
    socket.finished(current.id);
    if (reason) current.view.meta.textContent = `${figures(current)} · ${reason}`;
    send.disabled = false;
    stop.hidden = true;
    if (current.chat && current.view.text.textContent) {
      conversation.push({ role: "assistant", content: current.view.text.textContent });
    }
  }

  function figures(current) {
    const parts = [current.agent ? `served by ${current.agent}` : "not dispatched"];
    if (current.firstAt) {
      parts.push(`first token after ${formatSeconds((current.firstAt - current.sentAt) / 1000)}`);
      const tokens = current.tokens ?? current.pieces;
      const end = current.lastAt || performance.now();
      // tokens come a step's worth at a time: over a short reply, count from the request
      const since = end - current.firstAt >= 200 ? current.firstAt : current.sentAt;
      parts.push(`${tokens} tokens`);
      if (end > since) parts.push(`${formatNumber(tokens / ((end - since) / 1000), 1)} tokens/s`);
    }
    return parts.join(" · ");
  }

  function follow() {
    // keep the newest text in view, unless the reader scrolled up
    if (transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 80) {
      transcript.scrollTop = transcript.scrollHeight;
    }
  }

  function onMessage(message) {
    const current = running;
    if (!current) return;
    if (message.Error) {
      const { code, description } = message.Error.error;
      current.view.element.classList.add("failed");
      finish(`error ${code}: ${description}`);
      return;
    }
    const response = message.Response;
    current.agent = response.generated_by || current.agent;
    const token = response.response && response.response.GeneratedToken;
    if (!token) return;
    const [kind] = Object.keys(token);
    const value = token[kind];
    const now = performance.now();
    if (kind === "ContentToken" || kind === "ReasoningToken" || kind === "ToolCallToken" ||
        kind === "UndeterminableToken") {
      current.firstAt = current.firstAt || now;
      current.lastAt = now;
      current.pieces += 1;
      current.pending[kind === "ReasoningToken" ? "reasoning" : "text"] += String(value);
      if (!current.timer) current.timer = setTimeout(() => flush(current), FLUSH_MS);
      return;
    }
    if (kind === "Done") {
      current.lastAt = current.lastAt || now;
      current.tokens = value.usage.content_tokens + value.usage.reasoning_tokens;
      finish(null);
      current.view.meta.textContent = figures(current);
      return;
    }
    current.view.element.classList.add("failed");
    finish(`${kind}: ${value}`);
  }

  function generationBody() {
    const body = { max_tokens: optionalNumber(maxTokens) ?? 256 };
    const t = optionalNumber(temperature);
    const s = optionalNumber(seed);
    if (t !== undefined) body.temperature = t;
    if (s !== undefined) body.seed = s;
    return body;
  }

  async function generate(text) {
    const chat = mode.value === "chat";
    let variant;
    let body = generationBody();
    if (chat) {
      conversation.push({ role: "user", content: text });
      transcript.append(h("div", { class: "message user" }, h("div", { class: "role" }, "user"),
        h("div", { class: "text" }, text)));
      variant = "ContinueFromConversationHistory";
      body = { ...body, conversation_history: conversation.slice(), enable_thinking: thinking.checked };
    } else {
      transcript.append(h("div", { class: "message user" }, h("div", { class: "role" }, "prompt"),
        h("div", { class: "text" }, text)));
      variant = "ContinueFromRawPrompt";
      body = { ...body, raw_prompt: text };
    }
    const view = replyView(chat ? "assistant" : "raw");
    transcript.append(view.element);
    transcript.scrollTop = transcript.scrollHeight;
    const id = requestId();
    running = { id, view, chat, agent: null, sentAt: performance.now(), firstAt: null,
      lastAt: null, pieces: 0, tokens: null, chars: 0, timer: null,
      pending: { text: "", reasoning: "" } };
    send.disabled = true;
    stop.hidden = false;
    try {
      await socket.send(id, variant, body, { message: onMessage, closed: () => {} });
    } catch (error) {
      view.element.classList.add("failed");
      finish(error.message);
    }
  }

  async function embed(text) {
    const documents = text.split("\n").map((line) => line.trim()).filter(Boolean)
      .slice(0, MAX_DOCUMENTS).map((content, index) => ({ id: String(index + 1), content }));
    const rows = h("tbody", {});
    const meta = h("div", { class: "meta" }, "embedding…");
    transcript.append(h("div", { class: "message raw" }, h("div", { class: "role" }, "embeddings"),
      h("table", { class: "embeddings" }, h("thead", {}, h("tr", {}, ["document", "agent",
        "dimensions", "L2 norm", "first values"].map((name) => h("th", {}, name)))), rows), meta));
    const started = performance.now();
    send.disabled = true;
    try {
      await postNdjson("inference", "/api/v1/generate_embedding_batch",
        { input_batch: documents, normalization_method: normalization.value }, (message) => {
          if (message.Error) {
            meta.textContent = `error ${message.Error.error.code}: ${message.Error.error.description}`;
            return;
          }
          const result = message.Response && message.Response.response.Embedding;
          if (!result || result === "Done") return;
          if (result === "EmbeddingsDisabled") {
            meta.textContent = "embeddings are disabled in the desired state";
            return;
          }
          transcript.scrollTop = transcript.scrollHeight;
          if (result.Embedding) {
            const vector = result.Embedding.embedding;
            const norm = Math.sqrt(vector.reduce((sum, value) => sum + value * value, 0));
            rows.append(h("tr", {}, h("td", {}, result.Embedding.source_document_id),
              h("td", {}, message.Response.generated_by || ""), h("td", {}, String(vector.length)),
              h("td", {}, formatNumber(norm, 4)),
              h("td", {}, vector.slice(0, 6).map((value) => formatNumber(value, 4)).join(", "))));
          } else {
            rows.append(h("tr", {}, h("td", { colspan: 5 }, JSON.stringify(result))));
          }
        }, controller.signal);
      meta.textContent = `${rows.children.length} embeddings in ${formatSeconds((performance.now() - started) / 1000)}`;
    } catch (error) {
      if (!controller.signal.aborted) meta.textContent = error.message;
    } finally {
      send.disabled = false;
    }
  }

  const form = h("form", { class: "prompt-form" },
    h("div", { class: "inline-form" }, h("label", {}, "Mode ", mode), generationOnly, chatOnly,
      embeddingOnly),
    prompt,
    h("div", { class: "actions" }, send, stop, clear),
    note);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = prompt.value;
    if (!text.trim() || running) return;
    prompt.value = "";
    if (mode.value === "embeddings") embed(text);
    else generate(text);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
  stop.addEventListener("click", () => {
    if (!running) return;
    socket.stop(running.id);
    finish("stopped");
  });
  clear.addEventListener("click", () => {
    if (running) return;
    conversation = [];
    transcript.replaceChildren();
  });

  fill(root,
    h("section", { class: "card playground" }, h("h2", {}, "Prompt playground"), transcript, form));
  showMode();
  setStatus("live", null);
  request("management", "/api/v1/balancer_desired_state", { signal: controller.signal })
    .then((state) => {
      embeddingsEnabled = Boolean(state.inference_parameters && state.inference_parameters.enable_embeddings);
      const option = mode.querySelector("option[value=embeddings]");
      option.disabled = !embeddingsEnabled;
      option.textContent = embeddingsEnabled ? "Embeddings" : "Embeddings (off in the desired state)";
    })
    .catch(() => {});
  return {
    unmount: () => {
      controller.abort();
      socket.close();
    },
  };
}
