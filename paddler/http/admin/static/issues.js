// Every issue a paddler agent reports, in words: what it means, what paddler does about
// it, what the operator can do (a unit test holds this list to the kinds paddler/agent
// emits). Unknown issues are shown as their JSON text.

import { h } from "./dom.js";

const RELOADS = "The agent stays connected without a model and does not try again by " +
  "itself. It tries again when the desired state changes (another model, inference " +
  "parameters or chat template: saving the same state again does not retry) or when " +
  "the agent process restarts.";

const RETRY = "then restart the agent (or change the desired state) to make it try again";

const MODEL_PAGE = h("a", { href: "#/model" }, "model page");

function modelPageLink() {
  return MODEL_PAGE.cloneNode(true);
}

export const ISSUES = {
  ModelFileDoesNotExist: {
    title: (v) => `Model file does not exist: ${v.model_path}`,
    means: "The desired state names a file on the agent's own disk (LocalToAgent), and " +
      "there is no such file on this agent's host.",
    paddler: RELOADS,
    you: () => [`Copy the file to that path on the agent's host, ${RETRY}; or change the ` +
      "path on the ", modelPageLink(), "."],
  },
  ModelPathNotAllowed: {
    title: (v) => `Model path not allowed: ${v.model_path}`,
    means: "The file lies outside every folder the agent was started with " +
      "(--model-dir), after resolving symbolic links and '..'.",
    paddler: "The agent refuses to open it and loads nothing. " + RELOADS,
    you: () => ["Put the model in one of the agent's --model-dir folders and name that " +
      "path on the ", modelPageLink(), ", or restart the agent with another --model-dir."],
  },
  ModelCannotBeLoaded: {
    title: (v) => `Model cannot be loaded: ${v.model_path}`,
    means: "The agent could not load the model: llama.cpp refused the file (not a GGUF " +
      "model, damaged or truncated, an architecture it does not support, not enough " +
      "memory for the context asked), or the file could not be read (to check its " +
      "SHA-256, say). The error below says which.",
    paddler: RELOADS,
    you: () => ["Check the agent's log for llama.cpp's words, then name a valid file or ",
      "ask for less memory (context size, GPU layers) on the ", modelPageLink(),
      `; for a file you fixed in place, ${RETRY}.`],
    detail: (v) => v.error,
  },
  ModelDownloadFailed: {
    title: (v) => `Model download failed: ${v.url}`,
    means: "The agent could not download the model: the server answered with an error, " +
      "the connection broke, the download stalled (less than 64 KiB within " +
      "--model-stall-timeout), or the file could not be written.",
    paddler: "The agent keeps what it downloaded (the next attempt resumes where this one " +
      "stopped). " + RELOADS,
    you: () => [`Check that the URL works from the agent's host, ${RETRY}; or name ` +
      "another source on the ", modelPageLink(), "."],
    detail: (v) => v.error,
  },
  ModelHostNotAllowed: {
    title: (v) => `Model host not allowed: ${v.host}`,
    means: "The download would connect to a host that is not public (loopback, private " +
      "network...) and that the agent was not told to allow.",
    paddler: "The agent refuses to connect: a desired state must not make agents reach " +
      "into their own network. " + RELOADS,
    you: () => ["Restart the agent with --allow-model-host for that host if it is yours, " +
      "or use another URL on the ", modelPageLink(), "."],
    detail: (v) => v.error,
  },
  ModelTooLarge: {
    title: (v) => `Model too large: ${v.url}`,
    means: (v) => `The file is larger (${v.size} bytes) than the agent's --max-model-bytes ` +
      `(${v.max_bytes} bytes).`,
    paddler: "The agent refuses the file (a download stops as soon as its size is known " +
      "to be too large) and loads nothing. " + RELOADS,
    you: () => ["Choose a smaller model on the ", modelPageLink(),
      ", or restart the agent with a higher --max-model-bytes."],
  },
  ModelChecksumMismatch: {
    title: (v) => `Model checksum mismatch: ${v.model_path}`,
    means: (v) => `The file's SHA-256 is ${v.actual}, not the ${v.expected} the desired ` +
      "state declares: it is not the file you meant, or it was altered.",
    paddler: "The downloaded file is deleted and nothing is loaded. " + RELOADS,
    you: () => ["Check the digest and the source on the ", modelPageLink(), "."],
  },
  HuggingFaceModelDoesNotExist: {
    title: (v) => `Hugging Face model does not exist: ${v.model_path}`,
    means: "Hugging Face has no such repository, revision or file (or hides it).",
    paddler: RELOADS,
    you: () => ["Fix the repository, revision or file name on the ", modelPageLink(), "."],
  },
  HuggingFacePermissions: {
    title: (v) => `No permission to download from Hugging Face: ${v.model_path}`,
    means: "Hugging Face refused the download (401 or 403): the repository is gated and " +
      "the agent's token has not been granted access, or it needs a token and the agent " +
      "has none.",
    paddler: RELOADS,
    you: () => ["Check the name on the ", modelPageLink(),
      ", or give the agent a token (HF_TOKEN) that may read it."],
  },
  UnableToFindChatTemplate: {
    title: (v) => `No chat template: ${v.model_path}`,
    means: "The model file carries no chat template and no override is in use (or the " +
      "override in use is empty), so conversations cannot be turned into a prompt (raw " +
      "prompts still work).",
    paddler: "The model is loaded; conversation requests fail with 400 ChatTemplateError.",
    you: () => ["Give a chat template override on the ", modelPageLink(),
      " (the model's authors usually publish it)."],
  },
  ChatTemplateDoesNotCompile: {
    title: () => "Chat template does not compile",
    means: "The chat template (the model's, or the override) is not valid Jinja.",
    paddler: "The model is loaded; conversation requests fail with 400 ChatTemplateError.",
    you: () => ["Fix the override on the ", modelPageLink(), ", or give one if the " +
      "model's own template is the broken one."],
    detail: (v) => v.error,
  },
  EngineFailed: {
    title: (v) => (v.restarting ? "Engine failed: restarting" : "Engine failed: down"),
    means: "The agent's generation loop failed; its requests were given back to the " +
      "balancer, which continues streamed ones on other agents.",
    paddler: (v) => (v.restarting
      ? "The agent reloads the model of the desired state and takes work again."
      : "It failed more than 3 times in a minute, so the agent stays down until a new " +
        "desired state arrives."),
    you: (v) => (v.restarting
      ? "Usually nothing; if it keeps failing, read the agent's log for the cause."
      : ["Read the agent's log for the cause; saving the ", modelPageLink(),
        " (even unchanged) starts the engine again."]),
    detail: (v) => v.error,
  },
};

function text(value, data) {
  return typeof value === "function" ? value(data) : value;
}

/** The kind of an issue ({"Kind": {...}} or "Kind") and its data. */
export function issueKind(issue) {
  if (typeof issue === "string") return [issue, {}];
  if (issue && typeof issue === "object") {
    const kinds = Object.keys(issue);
    if (kinds.length === 1) {
      const data = issue[kinds[0]];
      return [kinds[0], data && typeof data === "object" ? data : { value: data }];
    }
  }
  return ["Unknown", {}];
}

/** One issue explained, as a list item. */
export function explainIssue(issue) {
  const [kind, data] = issueKind(issue);
  const known = Object.hasOwn(ISSUES, kind) ? ISSUES[kind] : null;
  if (!known) {
    return h("li", { class: "issue", dataset: { kind } },
      h("strong", {}, `Issue ${kind}`),
      h("p", {}, "paddler does not know this issue; as the agent reported it:"),
      h("pre", {}, JSON.stringify(issue, null, 2)));
  }
  const detail = known.detail ? known.detail(data) : null;
  return h("li", { class: "issue", dataset: { kind } },
    h("strong", {}, text(known.title, data)),
    detail ? h("pre", { class: "issue-detail" }, String(detail)) : null,
    h("dl", {},
      h("dt", {}, "What it means"), h("dd", {}, text(known.means, data)),
      h("dt", {}, "What paddler does"), h("dd", {}, text(known.paddler, data)),
      h("dt", {}, "What you can do"), h("dd", {}, text(known.you, data))));
}

/** What "stuck" means on the dashboard (not an issue an agent reports: the dashboard's
 * own reading of an agent that shows no change; see ``agentState`` in dashboard.js). */
export function explainStuck(afterMs) {
  const seconds = Math.round(afterMs / 1000);
  return h("li", { class: "issue", dataset: { kind: "stuck" } },
    h("strong", {}, `Stuck: no change for ${seconds} s or more`),
    h("dl", {},
      h("dt", {}, "What it means"),
      h("dd", {}, "The agent is not ready and is working toward a desired state that names " +
        "a model (loading it, downloading it, or restarting its engine), but nothing it " +
        `reports has changed (state, download progress, issues) for ${seconds} s or more, ` +
        "as this page saw it. A download reports its progress as it goes; loading a large " +
        "model from a slow disk can take longer than this without being stuck."),
      h("dt", {}, "What paddler does"),
      h("dd", {}, "Nothing more than it already did: the agent gets no requests until it is " +
        "ready, and a download that stalls ends on its own (--model-stall-timeout) as a " +
        "ModelDownloadFailed issue; loading a model has no time limit."),
      h("dt", {}, "What you can do"),
      h("dd", {}, "Read the agent's log and look at its host (disk, memory, network). If it " +
        "really hangs, restart the agent: it registers again and applies the desired state " +
        "from the start.")));
}
