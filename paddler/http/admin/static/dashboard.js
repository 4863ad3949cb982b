// The dashboard: the balancer's addresses, the buffer, every agent (live, from the
// management service's event streams), their issues in words, and how to add an agent.

import { getConfig, liveEvents, request } from "./api.js";
import { clip, fill, formatBytes, formatNumber, h } from "./dom.js";
import { explainIssue, explainStuck } from "./issues.js";

const MAX_AGENTS_SHOWN = 500;
const MAX_METADATA_VALUE = 400;
const STUCK_CHECK_MS = 5000;

/** How long an agent may work toward the desired state (loading, downloading, its
 * engine restarting) without any change in what it reports before the dashboard calls
 * it stuck. Agents report every change (a download's progress too), so a minute of
 * nothing is rare but not impossible: a large model loading from a slow disk. */
export const STUCK_AFTER_MS = 60_000;
const WORKING = new Set(["loading", "downloading", "retrying"]);

/** What of an agent's report changes while it makes progress. */
function progressOf(agent) {
  return JSON.stringify([agent.state_application_status, agent.ready, agent.model_path,
    agent.download_filename, agent.download_current, agent.download_total, agent.issues]);
}

/** When each agent's report last changed, as this page saw it: ``note(agents, now)``
 * at every agents list, ``unchangedFor(agent, now)`` in ms (times in ms, given by the
 * caller). Agents that left are forgotten. */
export function progressClock() {
  const seen = new Map();
  return {
    note(agents, now) {
      const present = new Set();
      for (const agent of agents) {
        present.add(agent.id);
        const progress = progressOf(agent);
        const known = seen.get(agent.id);
        if (!known || known.progress !== progress) seen.set(agent.id, { progress, since: now });
      }
      for (const id of [...seen.keys()]) if (!present.has(id)) seen.delete(id);
    },
    unchangedFor(agent, now) {
      const known = seen.get(agent.id);
      return known ? Math.max(0, now - known.since) : 0;
    },
  };
}

/** [state, words] of an agent: ready, idle, loading, downloading, retrying, stuck or
 * attention. ``unchangedMs``: how long its report has not changed (``progressClock``);
 * ``desiredModel``: whether the balancer's desired state names a model (``null``: not
 * known). Stuck: not ready, working toward a desired state that names a model (loading,
 * downloading, its engine restarting), and no change for ``STUCK_AFTER_MS`` or more. */
export function agentState(agent, { unchangedMs = 0, desiredModel = null } = {}) {
  const state = reportedState(agent, desiredModel);
  if (WORKING.has(state[0]) && !agent.ready && desiredModel !== false &&
      unchangedMs >= STUCK_AFTER_MS) {
    return ["stuck", `stuck: no change for ${STUCK_AFTER_MS / 1000} s or more`];
  }
  return state;
}

function reportedState(agent, desiredModel) {
  const issues = Array.isArray(agent.issues) ? agent.issues : [];
  const failed = issues.find((issue) => issue && issue.EngineFailed);
  if (failed) {
    return failed.EngineFailed.restarting
      ? ["retrying", "retrying: the engine restarts"]
      : ["attention", "needs attention: the engine is down"];
  }
  const status = agent.state_application_status;
  const downloading = agent.download_filename &&
    (agent.download_total === 0 || agent.download_current < agent.download_total);
  if (downloading && status !== "Applied" && status !== "AttemptedAndNotAppliable") {
    return ["downloading", "downloading the model"];
  }
  switch (status) {
    case "Applied":
      if (!agent.model_path) return ["idle", "no model (the desired state names none)"];
      return issues.length ? ["attention", "ready, with an issue"] : ["ready", "ready"];
    case "Fresh":  // also an agent that has had no desired state yet
      if (desiredModel === false && !agent.model_path) {
        return ["idle", "no model (the desired state names none)"];
      }
      return ["loading", "loading the model"];
    case "AttemptedAndNotAppliable":
      return ["attention", "needs attention"];
    default:
      return ["loading", String(status)];
  }
}

function bar(value, total, label, className = "") {
  const fraction = total > 0 ? Math.min(1, Math.max(0, value / total)) : 0;
  const inner = h("span", { class: "bar-fill" });
  inner.style.width = `${(fraction * 100).toFixed(1)}%`;
  return h("span", { class: `bar ${className}`, role: "progressbar",
    "aria-valuenow": value, "aria-valuemax": total, "aria-label": label }, inner);
}

function addressList(config) {
  const { urls, addresses } = config;
  const rows = [
    ["Inference", urls.inference, config.api_keys.inference ? "API key required" : "open"],
    ["Management", urls.management, config.api_keys.management ? "API key required" : "open"],
    ["OpenAI-compatible", urls.openai ? `${urls.openai}/v1` : "off", ""],
    ["Agents connect to", config.agents_address, config.curve ? "CurveZMQ keys" : "no curve"],
    ["Web admin panel", urls.panel || window.location.origin, config.tls ? "TLS" : ""],
  ];
  return h("table", { class: "addresses" },
    h("tbody", {}, rows.map(([name, value, note]) =>
      h("tr", {}, h("th", {}, name), h("td", {}, h("code", {}, value)),
        h("td", { class: "muted" }, note)))),
    h("caption", {}, `Bound as: inference ${addresses.inference}, management ` +
      `${addresses.management}, agents ${addresses.agents}`));
}

const PLAIN_WORD = /^[A-Za-z0-9._/:@%+=,-]+$/;
const KEYS_DIR = /^~?[A-Za-z0-9._/-]{1,200}$/;
const Z85_KEY = /^[0-9A-Za-z.\-:+=^!/*?&<>()[\]{}@%$#]{40}$/;

/** ``value`` as one word of a POSIX shell command (quoted when it must be). */
export function shellWord(value) {
  const text = String(value);
  return PLAIN_WORD.test(text) ? text : `'${text.replaceAll("'", "'\\''")}'`;
}

function isLoopbackHost(host) {
  return /^(127\.|localhost$|\[::1\]$)/.test(host);
}

function agentsHost(address) {
  return String(address).replace(/^tcp:\/\//, "").replace(/:\d+$/, "");
}

/** The commands that add an agent named ``name`` with ``slots`` slots; with curve, its
 * keypair goes in ``keysDir`` on the agent's host. With the agents socket on loopback
 * the agent runs on this host, so the balancer's own files are named as they are: its
 * public key file and its --authorized-agent-keys folder (``config.curve_keys``). */
export function addAgentCommand(config, { name, slots, keysDir }) {
  const lines = [];
  const curve = Boolean(config.curve);
  const keys = config.curve_keys || {};
  const local = isLoopbackHost(agentsHost(config.agents_address));
  let brokerKey = null;
  let secretKey = null;
  if (curve) {
    secretKey = `${keysDir}/${name}.key_secret`;
    const publicKey = `${keysDir}/${name}.key`;
    const folder = keys.authorized_agent_keys;
    lines.push(local
      ? "# a keypair for the new agent (on this host: the agents socket is loopback)"
      : "# on the new agent's host: a keypair for it");
    lines.push(`paddler keys generate --out ${keysDir} ${name}`);
    if (local && folder) {
      lines.push("# allow it: its public key into the balancer's --authorized-agent-keys folder");
      lines.push(`cp ${publicKey} ${shellWord(`${folder}/`)}`);
    } else {
      lines.push(`# allow it: copy ${publicKey} into ` +
        (folder ? `${folder}/ on the balancer's host (its --authorized-agent-keys folder)`
          : "the balancer's --authorized-agent-keys folder, on its host"));
    }
    if (local && keys.broker_public_key_file) {
      brokerKey = shellWord(keys.broker_public_key_file);
    } else {
      brokerKey = `${keysDir}/balancer.key`;
      const where = keys.broker_public_key_file
        ? ` (${keys.broker_public_key_file} on its host)` : "";
      if (Z85_KEY.test(keys.broker_public_key || "")) {
        lines.push(`# the balancer's public key${where}, written here:`);
        lines.push(`cat > ${brokerKey} <<'EOF'`, "metadata", "curve",
          `    public-key = "${keys.broker_public_key}"`, "EOF");
      } else {
        lines.push(`# copy the balancer's public key${where} here as ${brokerKey}`);
      }
    }
  }
  lines.push(`paddler agent --broker-addr ${shellWord(config.agents_address)} ` +
    `--slots ${slots} --name ${name}${curve ? " \\" : ""}`);
  if (curve) {
    lines.push(`  --broker-public-key ${brokerKey} \\`);
    lines.push(`  --curve-secret-key ${secretKey}`);
  }
  return lines.join("\n");
}

function addAgent(config) {
  const name = h("input", { value: "my-agent", size: 14, "aria-label": "agent name",
    spellcheck: "false" });
  const slots = h("input", { type: "number", value: "4", min: "1", max: "4096",
    "aria-label": "slots", class: "narrow" });
  const keysDir = h("input", { value: "~/paddler-keys", size: 22, spellcheck: "false",
    "aria-label": "keys folder on the agent's host" });
  const command = h("pre", { class: "command", "data-test": "add-agent-command" });
  const render = () => {
    const agent = name.value.trim();
    const folder = keysDir.value.trim().replace(/\/+$/, "");
    command.textContent = addAgentCommand(config, {
      name: /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$/.test(agent) ? agent : "my-agent",
      slots: Math.max(1, Math.min(4096, parseInt(slots.value, 10) || 4)),
      keysDir: KEYS_DIR.test(folder) ? folder : "~/paddler-keys",
    });
  };
  for (const input of [name, slots, keysDir]) input.addEventListener("input", render);
  render();
  const loopback = isLoopbackHost(agentsHost(config.addresses.agents));
  return h("section", { class: "card", id: "add-agent" },
    h("h2", {}, "Add an agent"),
    h("p", {}, "Run this on the host that has the model (or can download it). The agent " +
      "connects to the balancer, gets the desired state and loads its model; it shows up " +
      "above within seconds."),
    h("div", { class: "inline-form" }, h("label", {}, "Name ", name),
      h("label", {}, "Slots ", slots),
      config.curve ? h("label", {}, "Keys folder ", keysDir) : null),
    command,
    loopback ? h("p", { class: "warning" }, "The agents socket listens on a loopback " +
      "address: only agents on this host can reach it. For other hosts, start the " +
      "balancer with --agents-addr tcp://0.0.0.0:8070 and CurveZMQ keys.") : null,
    h("p", { class: "muted" }, "Slots are the requests an agent serves at once; start " +
      "with 4 or 8 and measure. One agent per machine is best: give it more slots rather " +
      "than starting a second one."));
}

function modelDetails(agent) {
  const box = h("div", { class: "details", "data-test": "agent-details" }, "Loading…");
  const id = encodeURIComponent(agent.id);
  Promise.all([
    request("management", `/api/v1/agent/${id}/model_metadata`),
    request("management", `/api/v1/agent/${id}/chat_template_override`),
  ]).then(([metadata, override]) => {
    const values = (metadata && metadata.metadata) || {};
    const template = values["tokenizer.chat_template"];
    const keys = Object.keys(values).filter((k) => k !== "tokenizer.chat_template").sort();
    fill(box,
      h("h4", {}, "GGUF metadata"),
      keys.length
        ? h("table", { class: "metadata" }, h("tbody", {}, keys.map((key) =>
          h("tr", {}, h("th", {}, key), h("td", {}, clip(values[key], MAX_METADATA_VALUE))))))
        : h("p", { class: "muted" }, "No model loaded, or no metadata."),
      h("h4", {}, "Chat template (the model's own)"),
      template ? h("pre", { class: "code" }, template)
        : h("p", { class: "muted" }, "The model carries none."),
      override && typeof override.content === "string"
        ? [h("h4", {}, agent.uses_chat_template_override
          ? "Chat template override (in use)" : "Chat template override (not in use)"),
        h("pre", { class: "code", "data-test": "override" }, override.content)]
        : null);
  }).catch((error) => fill(box, h("p", { class: "error" }, `Could not ask the agent: ${error.message}`)));
  return box;
}

function agentCard(agent, [state, words], details, toggle) {
  const expanded = details !== null;
  const issues = Array.isArray(agent.issues) ? agent.issues : [];
  const desired = agent.desired_slots_total || agent.slots_total;
  const download = state === "downloading"
    ? h("div", { class: "download" },
      h("span", {}, `Downloading ${agent.download_filename || ""}: `,
        agent.download_indeterminate
          ? formatBytes(agent.download_current)
          : `${formatBytes(agent.download_current)} of ${formatBytes(agent.download_total)}`),
      agent.download_indeterminate
        ? h("span", { class: "bar indeterminate" }, h("span", { class: "bar-fill" }))
        : bar(agent.download_current, agent.download_total, "download", "download-bar"))
    : null;
  return h("article", { class: `agent state-${state}`, dataset: { agentId: agent.id,
    agentName: agent.name || "" } },
    h("header", {},
      h("h3", {}, agent.name || agent.id),
      h("span", { class: `badge badge-${state}`, "data-test": "agent-state" }, words)),
    h("div", { class: "slots" },
      h("span", { class: "slots-text" }, "Slots processing ",
        h("strong", { "data-test": "slots-processing" }, String(agent.slots_processing)),
        " / ", h("span", { "data-test": "slots-total" }, String(agent.slots_total)),
        " (desired ", String(desired), ")"),
      bar(agent.slots_processing, agent.slots_total, "slots processing")),
    h("div", { class: "model" }, "Model file: ",
      h("code", {}, agent.model_path || "none")),
    download,
    h("div", { class: "muted small" }, `id ${agent.id}`,
      agent.key_fingerprint ? ` · key ${agent.key_fingerprint}` : "",
      ` · ${agent.state_application_status}`,
      agent.uses_chat_template_override ? " · chat template override" : ""),
    issues.length || state === "stuck"
      ? h("ul", { class: "issues" }, state === "stuck" ? explainStuck(STUCK_AFTER_MS) : null,
        issues.map(explainIssue))
      : null,
    h("button", { type: "button", class: "link", onclick: toggle,
      "aria-expanded": expanded ? "true" : "false" },
    expanded ? "Hide model details" : "Model details: GGUF metadata, chat template"),
    details);
}

export function mountDashboard(root, { setStatus }) {
  const config = getConfig();
  const controller = new AbortController();
  const expanded = new Set();
  const detailBoxes = new Map();
  let agents = [];
  const clock = progressClock();
  let desiredModel = null;  // whether the desired state names a model (null: not known yet)
  let desiredAsked = 0;
  let shownStates = "";
  const agentsBox = h("div", { class: "agents", "data-test": "agents" }, "Waiting for the agents list…");
  const summary = h("span", { class: "muted" });
  const buffered = h("div", { class: "buffered", "data-test": "buffered" });
  const desired = h("p", { class: "desired muted" });

  function renderBuffered(current) {
    const max = config.max_buffered_requests;
    fill(buffered,
      h("div", {}, "Buffered requests ",
        h("strong", { "data-test": "buffered-current" }, String(current)), ` / ${max}`),
      bar(current, max, "buffered requests", current >= max ? "full" : ""),
      h("div", { class: "muted small" },
        `A request waits at most ${formatNumber(config.buffered_request_timeout_ms / 1000, 1)} s ` +
        "for a free slot (then 504); past the maximum, new requests get 503 at once."));
  }

  function statesOf(shown, now) {
    return shown.map((agent) =>
      agentState(agent, { unchangedMs: clock.unchangedFor(agent, now), desiredModel }));
  }

  function renderAgents() {
    const shown = agents.slice(0, MAX_AGENTS_SHOWN);
    const states = statesOf(shown, Date.now());
    shownStates = JSON.stringify(states);
    const busy = agents.reduce((sum, agent) => sum + agent.slots_processing, 0);
    const total = agents.reduce((sum, agent) => sum + agent.slots_total, 0);
    summary.textContent = `${agents.length} agent${agents.length === 1 ? "" : "s"} · ` +
      `${busy} of ${total} slots processing`;
    if (!agents.length) {
      fill(agentsBox, h("p", { class: "empty" }, "No agent is connected. Requests wait in " +
        "the buffer until one joins: see “Add an agent” below."));
      return;
    }
    // an open details panel (and what it loaded) is kept across updates
    fill(agentsBox, shown.map((agent, index) => {
      let details = null;
      if (expanded.has(agent.id)) {
        if (!detailBoxes.has(agent.id)) detailBoxes.set(agent.id, modelDetails(agent));
        details = detailBoxes.get(agent.id);
      }
      return agentCard(agent, states[index], details, () => {
        if (expanded.has(agent.id)) expanded.delete(agent.id);
        else expanded.add(agent.id);
        detailBoxes.delete(agent.id);
        renderAgents();
      });
    }),
    agents.length > shown.length
      ? h("p", { class: "muted" }, `…and ${agents.length - shown.length} more agents`) : null);
  }

  renderBuffered(0);
  fill(root,
    h("section", { class: "card" }, h("h2", {}, "Balancer"), addressList(config), desired),
    h("section", { class: "card" }, buffered),
    h("section", { class: "card" }, h("h2", {}, "Agents ", summary), agentsBox),
    addAgent(config));

  function loadDesiredState() {
    desiredAsked = Date.now();
    request("management", "/api/v1/balancer_desired_state", { signal: controller.signal })
      .then((state) => {
        const model = state.model;
        let text = "none";
        if (model && typeof model === "object") {
          const [kind] = Object.keys(model);
          const value = model[kind];
          text = typeof value === "string" ? value
            : value.url || [value.repo_id, value.revision, value.filename].join(" / ");
        }
        desired.textContent = `Desired model: ${text}`;
        desiredModel = text !== "none";
        if (agents.length) renderAgents();
      })
      .catch(() => {});
  }

  // an agent becomes stuck by sending nothing: look again every few seconds, and ask
  // for the desired state again (at most twice a minute) while one is not ready, not
  // settled and silent for that long (the desired state may have changed since)
  const stuckTimer = setInterval(() => {
    const now = Date.now();
    const shown = agents.slice(0, MAX_AGENTS_SHOWN);
    const silent = (agent) => !agent.ready && WORKING.has(reportedState(agent, null)[0]) &&
      clock.unchangedFor(agent, now) >= STUCK_AFTER_MS;
    if (now - desiredAsked >= STUCK_AFTER_MS / 2 && shown.some(silent)) loadDesiredState();
    if (JSON.stringify(statesOf(shown, now)) !== shownStates) renderAgents();
  }, STUCK_CHECK_MS);

  loadDesiredState();
  liveEvents("management", "/api/v1/agents/stream", (value) => {
    agents = Array.isArray(value.agents) ? value.agents : [];
    clock.note(agents, Date.now());
    renderAgents();
  }, setStatus, controller.signal);
  liveEvents("management", "/api/v1/buffered_requests/stream", (value) => {
    renderBuffered(value.buffered_requests_current);
  }, () => {}, controller.signal);
  return { unmount: () => { clearInterval(stuckTimer); controller.abort(); } };
}
