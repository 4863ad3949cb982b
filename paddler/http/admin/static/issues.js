// Every issue an agent can report, in words: what it means, what paddler does about
// it, what the operator can do. Unknown issues are shown as their JSON text.

import { h } from "./dom.js";

const RELOADS = "The agent stays connected without a model and does not try again by " +
  "itself: it tries again when a new desired state arrives (save the model page) or when " +
  "the agent restarts.";

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
    you: () => ["Copy the file to that path on the agent's host, or change the path on the ",
      modelPageLink(), "."],
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
    means: "The file is there, but llama.cpp could not load it: it is not a GGUF model, " +
      "it is damaged or truncated, its architecture is not supported, or the machine ran " +
      "out of memory." ,
    paddler: RELOADS,
    you: () => ["Check the agent's log for llama.cpp's words, then give a valid file or ",
      "smaller inference parameters (context size, GPU layers) on the ", modelPageLink(), "."],
    detail: (v) => v.error,
  },
  ModelDownloadFailed: {
    title: (v) => `Model download failed: ${v.url}`,
    means: "The agent could not download the model: the server answered with an error, " +
      "the connection broke, or the download stalled (less than 64 KiB within " +
      "--model-stall-timeout).",
    paddler: "The agent keeps what it downloaded (a URL download resumes where it stopped). " +
      RELOADS,
    you: () => ["Check that the URL works from the agent's host, then save the ",
      modelPageLink(), " again to retry."],
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
    paddler: "The download stops and nothing is loaded. " + RELOADS,
    you: () => ["Choose a smaller model on the ", modelPageLink(),
      ", or restart the agent with a higher --max-model-bytes."],
  },
  ModelChecksumMismatch: {
    title: (v) => `Model checksum mismatch: ${v.model_path}`,
    means: (v) => `The file's SHA-256 is ${v.actual}, not the ${v.expected} the desired ` +
      "state declares: it is not the file you meant, or it was altered.",
    paddler: "The file is deleted and nothing is loaded. " + RELOADS,
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
    means: "The repository is gated or private, or the organization name is mistyped " +
      "(Hugging Face answers 401 then, not 404).",
    paddler: RELOADS,
    you: () => ["Check the name on the ", modelPageLink(),
      ", or give the agent a token (HF_TOKEN) that may read it."],
  },
  HuggingFaceCannotAcquireLock: {
    title: (v) => `Hugging Face cache is locked: ${v.model_path && (v.model_path.model_path || v.model_path)}`,
    means: "Another process is downloading the same file into the cache.",
    paddler: "The agent tries again later.",
    you: () => "Usually nothing: it clears when the other download ends.",
  },
  UnableToFindChatTemplate: {
    title: (v) => `No chat template: ${v.model_path}`,
    means: "The model file carries no chat template, so conversations cannot be turned " +
      "into a prompt (raw prompts still work).",
    paddler: "The model is loaded; conversation requests fail with ChatTemplateError.",
    you: () => ["Give a chat template override on the ", modelPageLink(),
      " (the model's authors usually publish it)."],
  },
  ChatTemplateDoesNotCompile: {
    title: () => "Chat template does not compile",
    means: "The chat template (the model's, or the override) is not valid Jinja.",
    paddler: "The model is loaded; conversation requests fail with ChatTemplateError.",
    you: () => ["Fix the template override on the ", modelPageLink(), "."],
    detail: (v) => v.error,
  },
  MultimodalProjectionCannotBeLoaded: {
    title: (v) => `Multimodal projection cannot be loaded: ${v.model_path}`,
    means: "The projector file of the desired state could not be loaded.",
    paddler: RELOADS,
    you: () => ["Check the projector on the ", modelPageLink(), "."],
  },
  SlotCannotStart: {
    title: (v) => `Slot ${v.slot_index} cannot start`,
    means: "One of the agent's slots failed to start.",
    paddler: "The agent serves with the slots that started.",
    you: () => "Check the agent's log.",
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
    you: () => ["Read the agent's log for the cause; save the ", modelPageLink(),
      " to try again."],
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
