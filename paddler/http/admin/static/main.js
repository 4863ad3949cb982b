// The panel's start: read /config.json, ask for the API keys the services need (kept
// in sessionStorage, for this tab's session only), then show the page the URL's hash
// names: #/ (dashboard), #/charts, #/model, #/playground.

import {
  checkInferenceKey, forgetKeys, getConfig, missingKeys, onUnauthorized, request, setConfig,
  storedKeys, storeKeys,
} from "./api.js";
import { mountCharts } from "./charts.js";
import { mountDashboard } from "./dashboard.js";
import { fill, h } from "./dom.js";
import { mountModel } from "./model.js";
import { mountPlayground } from "./playground.js";

const PAGES = {
  "": ["Dashboard", mountDashboard],
  charts: ["Charts", mountCharts],
  model: ["Model", mountModel],
  playground: ["Playground", mountPlayground],
};
const BROWSER_KEY = /^[A-Za-z0-9._~+-]+$/;

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const status = document.getElementById("status");
const account = document.getElementById("account");
let current = null;

function setStatus(state, error) {
  status.dataset.state = state;
  status.textContent = state === "live" ? "live" : "reconnecting…";
  status.title = error ? String(error.message || error) : "";
}

function page() {
  const name = window.location.hash.replace(/^#\/?/, "").split("/")[0];
  return Object.hasOwn(PAGES, name) ? name : "";
}

function route() {
  if (current) current.unmount();
  current = null;
  const name = page();
  for (const link of nav.querySelectorAll("a")) {
    link.classList.toggle("active", link.dataset.page === name);
    if (link.dataset.page === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const [title, mount] = PAGES[name];
  document.title = `paddler · ${title}`;
  main.replaceChildren();
  current = mount(main, { setStatus }) || { unmount() {} };
}

function renderAccount() {
  const keys = storedKeys();
  fill(account, Object.keys(keys).length
    ? h("button", { type: "button", class: "link", onclick: () => {
      forgetKeys();
      window.location.reload();
    } }, "Forget the API keys")
    : null);
}

/** The key dialog: resolves once every required key is stored and accepted. */
function askForKeys(reason) {
  const config = getConfig();
  if (current) current.unmount();
  current = null;
  return new Promise((resolve) => {
    const inputs = {};
    const errors = {};
    const fields = ["management", "inference"].filter((name) => config.api_keys[name]).map((name) => {
      const input = h("input", { type: "password", autocomplete: "off", spellcheck: "false",
        id: `key-${name}`, "data-test": `key-${name}`, required: true });
      inputs[name] = input;
      errors[name] = h("p", { class: "field-error", hidden: true, "data-error-for": `key-${name}` });
      return h("div", { class: "field" },
        h("label", { for: input.id }, name === "management" ? "Management API key" : "Inference API key"),
        input, errors[name]);
    });
    const submit = h("button", { type: "submit" }, "Continue");
    const form = h("form", { class: "card keys", "data-test": "keys-form" },
      h("h2", {}, "API keys"),
      h("p", {}, reason || "This balancer requires API keys. The panel keeps them in this " +
        "browser tab until it closes (sessionStorage), and sends them only to the balancer."),
      fields, submit);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      submit.disabled = true;
      let ok = true;
      const keys = {};
      for (const [name, input] of Object.entries(inputs)) {
        errors[name].hidden = true;
        keys[name] = input.value.trim();
      }
      if (keys.management !== undefined) {
        storeKeys({ ...storedKeys(), management: keys.management });
        try {
          await request("management", "/api/v1/buffered_requests");
        } catch (error) {
          ok = false;
          const { management: _, ...others } = storedKeys();
          storeKeys(others);
          errors.management.textContent = error.status === 401
            ? "The management service does not accept this key." : error.message;
          errors.management.hidden = false;
        }
      }
      if (keys.inference !== undefined) {
        if (!BROWSER_KEY.test(keys.inference)) {
          ok = false;
          errors.inference.textContent = "A browser can send only keys of letters, digits and " +
            "- . _ ~ + (no / or =) over a WebSocket.";
          errors.inference.hidden = false;
        } else if (await checkInferenceKey(keys.inference)) {
          storeKeys({ ...storedKeys(), inference: keys.inference });
        } else {
          ok = false;
          errors.inference.textContent = "The inference service does not accept this key.";
          errors.inference.hidden = false;
        }
      }
      submit.disabled = false;
      if (!ok) return;
      renderAccount();
      resolve();
    });
    fill(main, form);
    const first = Object.values(inputs)[0];
    if (first) first.focus();
  });
}

async function start() {
  let config;
  try {
    const response = await fetch("/config.json", { cache: "no-store" });
    config = await response.json();
  } catch (error) {
    fill(main, h("p", { class: "error" }, `Cannot read the panel's configuration: ${error.message}`));
    return;
  }
  setConfig(config);
  document.getElementById("version").textContent = `paddler ${config.version}`;
  fill(nav, Object.entries(PAGES).map(([name, [title]]) =>
    h("a", { href: `#/${name}`, dataset: { page: name } }, title)));
  if (missingKeys().length) await askForKeys();
  renderAccount();
  let asking = false;
  onUnauthorized(async (service) => {
    if (asking) return;
    asking = true;
    const keys = storedKeys();
    delete keys[service];
    storeKeys(keys);
    await askForKeys(`The ${service} service no longer accepts the key: give it again.`);
    asking = false;
    route();
  });
  window.addEventListener("hashchange", route);
  route();
}

start();
