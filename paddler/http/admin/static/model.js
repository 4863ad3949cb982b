// The model page: a form for the whole desired state. The inference parameters, their
// bounds and defaults come from the management service's OpenAPI document (the same
// shapes that validate the desired state), and the balancer validates what is saved:
// a 400 names the field, and its message is shown next to that field.

import { request } from "./api.js";
import { fill, h } from "./dom.js";

const HINTS = {
  n_batch: "Most tokens decoded in one step (prompt chunks and generated tokens together).",
  context_size: "Tokens of context of each slot (prompt and answer).",
  embedding_batch_size: "Most tokens of one document to embed; longer ones are refused.",
  enable_embeddings: "Load the model for embeddings too (the playground's embeddings mode).",
  image_resize_to_fit: "Images are scaled to fit this many pixels a side (multimodal models).",
  k_cache_dtype: "Precision of the KV cache's keys (lower: less memory).",
  v_cache_dtype: "Precision of the KV cache's values.",
  min_p: "Drop tokens less likely than this fraction of the likeliest one.",
  n_gpu_layers: "Layers offloaded to a GPU (0: CPU only).",
  penalty_frequency: "Penalty growing with how often a token appeared.",
  penalty_last_n: "Tokens the penalties look back on (-1: the whole context, 0: none).",
  penalty_presence: "Penalty for a token that appeared at all.",
  penalty_repeat: "Repetition penalty (1: none).",
  pooling_type: "How a document's token embeddings become one vector.",
  temperature: "Randomness (0: always the likeliest token). Requests may set their own.",
  top_k: "Sample among the k likeliest tokens (0: all).",
  top_p: "Sample among the likeliest tokens that make up this probability.",
};

const SOURCE_KINDS = [
  ["None", "None"],
  ["LocalToAgent", "A file on each agent's disk"],
  ["Url", "A URL (each agent downloads it)"],
  ["HuggingFace", "A Hugging Face file"],
];

function field(label, input, path, hint) {
  input.dataset.field = path;
  input.id = input.id || `field-${path.replace(/[^A-Za-z0-9]+/g, "-")}`;
  return h("div", { class: "field" },
    h("label", { for: input.id }, label),
    input,
    hint ? h("p", { class: "hint" }, hint) : null,
    h("p", { class: "field-error", "data-error-for": path, hidden: true, role: "alert" }));
}

function textInput(value, attributes = {}) {
  return h("input", { type: "text", value: value ?? "", spellcheck: "false",
    autocomplete: "off", ...attributes });
}

/** The editor of a model source ("model" or "multimodal_projection"). */
function sourceEditor(path, value) {
  let kind = "None";
  let data = {};
  if (value && typeof value === "object") {
    [kind] = Object.keys(value);
    data = value[kind];
  }
  const select = h("select", {}, SOURCE_KINDS.map(([name, label]) =>
    h("option", { value: name, selected: name === kind }, label)));
  const local = textInput(kind === "LocalToAgent" ? data : "",
    { placeholder: "/models/model.gguf" });
  const url = textInput(kind === "Url" ? data.url : "",
    { placeholder: "https://example.com/model.gguf" });
  const urlSha = textInput(kind === "Url" ? data.sha256 : "", { placeholder: "optional" });
  const repo = textInput(kind === "HuggingFace" ? data.repo_id : "",
    { placeholder: "Qwen/Qwen2.5-0.5B-Instruct-GGUF" });
  const revision = textInput(kind === "HuggingFace" ? data.revision : "main");
  const file = textInput(kind === "HuggingFace" ? data.filename : "",
    { placeholder: "qwen2.5-0.5b-instruct-q4_k_m.gguf" });
  const hfSha = textInput(kind === "HuggingFace" ? data.sha256 : "", { placeholder: "optional" });
  const panels = {
    None: h("div", { class: "source-panel" }),
    LocalToAgent: h("div", { class: "source-panel" },
      field("Path on the agents", local, `${path}.LocalToAgent`,
        "Each agent opens this file on its own host (within its --model-dir, if it has one).")),
    Url: h("div", { class: "source-panel" },
      field("URL", url, `${path}.Url.url`, "Each agent downloads it into its cache."),
      field("SHA-256", urlSha, `${path}.Url.sha256`,
        "The digest the file must have before it loads.")),
    HuggingFace: h("div", { class: "source-panel" },
      field("Repository", repo, `${path}.HuggingFace.repo_id`),
      field("Revision", revision, `${path}.HuggingFace.revision`),
      field("File", file, `${path}.HuggingFace.filename`),
      field("SHA-256", hfSha, `${path}.HuggingFace.sha256`, "Optional.")),
  };
  const show = () => {
    for (const [name, panel] of Object.entries(panels)) panel.hidden = name !== select.value;
  };
  select.addEventListener("change", show);
  show();
  const optional = (input) => (input.value.trim() ? { sha256: input.value.trim() } : {});
  return {
    element: h("div", { class: "source" }, field("Source", select, path), Object.values(panels)),
    value() {
      switch (select.value) {
        case "LocalToAgent":
          return { LocalToAgent: local.value };
        case "Url":
          return { Url: { url: url.value.trim(), ...optional(urlSha) } };
        case "HuggingFace":
          return { HuggingFace: { repo_id: repo.value.trim(), revision: revision.value.trim(),
            filename: file.value.trim(), ...optional(hfSha) } };
        default:
          return "None";
      }
    },
  };
}

function parameterInput(name, schema, value) {
  if (Array.isArray(schema.enum)) {
    return h("select", {}, schema.enum.map((option) =>
      h("option", { value: option, selected: option === value }, option)));
  }
  if (schema.type === "boolean") return h("input", { type: "checkbox", checked: Boolean(value) });
  return h("input", { type: "number", value: value ?? "", step: schema.type === "integer" ? "1" : "any",
    min: schema.minimum, max: schema.maximum, class: "narrow", inputmode: "decimal" });
}

function parameterValue(schema, input) {
  if (schema.type === "boolean") return input.checked;
  if (Array.isArray(schema.enum)) return input.value;
  const text = input.value.trim();
  return text === "" ? null : Number(text); // the balancer says what is wrong with it
}

function bounds(schema) {
  if (Array.isArray(schema.enum) || schema.type === "boolean") return "";
  return `from ${schema.minimum} to ${schema.maximum}, default ${schema.default}`;
}

function codeArea(value) {
  const area = h("textarea", { class: "code", rows: 12, spellcheck: "false", wrap: "off",
    autocomplete: "off", "aria-label": "chat template override" });
  area.value = value || "";
  area.addEventListener("keydown", (event) => {
    if (event.key !== "Tab" || event.shiftKey) return;
    event.preventDefault();
    area.setRangeText("  ", area.selectionStart, area.selectionEnd, "end");
  });
  return area;
}

function modelTemplate(agents) {
  const agent = agents.find((a) => a.model_path);
  if (!agent) return Promise.resolve(null);
  return request("management", `/api/v1/agent/${encodeURIComponent(agent.id)}/model_metadata`)
    .then((answer) => (answer && answer.metadata && answer.metadata["tokenizer.chat_template"]) || null);
}

export function mountModel(root) {
  const controller = new AbortController();
  const signal = controller.signal;
  fill(root, h("p", { class: "muted" }, "Loading the desired state…"));
  Promise.all([
    request("management", "/api/v1/balancer_desired_state", { signal }),
    request("management", "/openapi.json", { signal }),
    request("management", "/api/v1/agents", { signal }),
  ]).then(([state, openapi, agentsList]) => {
    const schemas = (openapi.components && openapi.components.schemas) || {};
    const parameters = (schemas.InferenceParameters && schemas.InferenceParameters.properties) || {};
    build(root, state, parameters, agentsList.agents || []);
  }).catch((error) => {
    if (!signal.aborted) fill(root, h("p", { class: "error" }, `Could not load: ${error.message}`));
  });
  return { unmount: () => controller.abort() };
}

function build(root, state, parameters, agents) {
  const model = sourceEditor("model", state.model);
  const override = state.chat_template_override;
  const ownTemplate = h("input", { type: "radio", name: "template", value: "own",
    checked: !state.use_chat_template_override });
  const useOverride = h("input", { type: "radio", name: "template", value: "override",
    checked: Boolean(state.use_chat_template_override) });
  const area = codeArea(override && override.content);
  const loadTemplate = h("button", { type: "button", class: "secondary" },
    "Start from the model's own template");
  loadTemplate.addEventListener("click", () => {
    modelTemplate(agents).then((template) => {
      if (template) area.value = template;
      else loadTemplate.textContent = "No agent has a model with a template";
    }).catch((error) => { loadTemplate.textContent = error.message; });
  });
  const inputs = {};
  const values = state.inference_parameters || {};
  const parameterFields = Object.entries(parameters).map(([name, schema]) => {
    const input = parameterInput(name, schema, values[name] ?? schema.default);
    inputs[name] = [schema, input];
    const label = h("span", {}, schema.title || name, " ", h("code", { class: "muted" }, name));
    const hint = [HINTS[name] || "", bounds(schema)].filter(Boolean).join(" ");
    return field(label, input, `inference_parameters.${name}`, hint);
  });
  const defaults = h("button", { type: "button", class: "secondary" }, "Default parameters");
  defaults.addEventListener("click", () => {
    for (const [schema, input] of Object.values(inputs)) {
      if (schema.type === "boolean") input.checked = Boolean(schema.default);
      else input.value = schema.default;
    }
  });
  const formError = h("p", { class: "error", role: "alert", hidden: true, "data-test": "form-error" });
  const saved = h("p", { class: "success", role: "status", hidden: true, "data-test": "saved" });
  const save = h("button", { type: "submit" }, "Save and apply");
  const form = h("form", { class: "model-form", novalidate: true },
    h("section", { class: "card" }, h("h2", {}, "Model"), model.element),
    h("section", { class: "card" }, h("h2", {}, "Multimodal projector"),
      h("p", { class: "muted", "data-test": "no-projector" },
        "Not supported: the agents serve text-only models (requests with images get a 400)."),
      h("p", { class: "field-error", "data-error-for": "multimodal_projection", hidden: true })),
    h("section", { class: "card" }, h("h2", {}, "Chat template"),
      h("div", { class: "field" },
        h("label", { class: "radio" }, ownTemplate, " The model's own chat template"),
        h("label", { class: "radio" }, useOverride, " This override:"),
        h("p", { class: "field-error", "data-error-for": "use_chat_template_override", hidden: true })),
      field("Chat template override (Jinja)", area, "chat_template_override",
        "Rendered with messages, add_generation_prompt, enable_thinking, tools, bos_token, eos_token."),
      loadTemplate),
    h("section", { class: "card" }, h("h2", {}, "Inference parameters"),
      h("div", { class: "parameters" }, parameterFields), defaults),
    h("div", { class: "actions" }, save, formError, saved));

  function clearErrors() {
    formError.hidden = true;
    saved.hidden = true;
    for (const element of form.querySelectorAll(".field-error")) {
      element.hidden = true;
      element.textContent = "";
    }
    for (const element of form.querySelectorAll("[aria-invalid]")) element.removeAttribute("aria-invalid");
  }

  function showError(fieldPath, message) {
    let path = fieldPath || "";
    while (path) {
      const slot = [...form.querySelectorAll("[data-error-for]")]
        .find((element) => element.dataset.errorFor === path);
      if (slot) {
        slot.textContent = message;
        slot.hidden = false;
        const input = [...form.querySelectorAll("[data-field]")]
          .find((element) => element.dataset.field === path);
        if (input) {
          input.setAttribute("aria-invalid", "true");
          input.focus();
        }
        slot.scrollIntoView({ block: "center" });
        return;
      }
      path = path.includes(".") ? path.slice(0, path.lastIndexOf(".")) : "";
    }
    formError.textContent = message;
    formError.hidden = false;
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    clearErrors();
    const desired = {
      model: model.value(),
      multimodal_projection: "None",
      inference_parameters: Object.fromEntries(Object.entries(inputs)
        .map(([name, [schema, input]]) => [name, parameterValue(schema, input)])),
      chat_template_override: area.value ? { content: area.value } : null,
      use_chat_template_override: useOverride.checked,
    };
    save.disabled = true;
    request("management", "/api/v1/balancer_desired_state", { method: "PUT", body: desired })
      .then(() => {
        saved.textContent = "Saved. The agents are applying it: watch their state on the dashboard.";
        saved.hidden = false;
      })
      .catch((error) => {
        const message = error.field && error.message.startsWith(`${error.field}: `)
          ? error.message.slice(error.field.length + 2) : error.message;
        showError(error.field, message);
      })
      .finally(() => { save.disabled = false; });
  });
  fill(root, form);
}
