// Building the page: every text goes in through textContent or text nodes, never as
// HTML, so nothing the balancer or an agent sends can become markup or script.

const PROPERTIES = new Set(["value", "checked", "selected", "disabled", "readOnly", "open"]);

function addChildren(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function setAttributes(element, attributes) {
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") element.setAttribute("class", value);
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (name.startsWith("on") && typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else if (PROPERTIES.has(name)) element[name] = value;
    else element.setAttribute(name, value === true ? "" : String(value));
  }
}

/** An HTML element: h("p", {class: "x"}, "text", h("b", {}, "bold")). */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  setAttributes(element, attributes);
  addChildren(element, children);
  return element;
}

/** An SVG element, the same way. */
export function svg(tag, attributes = {}, ...children) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
  setAttributes(element, attributes);
  addChildren(element, children);
  return element;
}

/** Replace every child of element. */
export function fill(element, ...children) {
  element.replaceChildren();
  addChildren(element, children);
  return element;
}

export function formatNumber(value, digits = 1) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString("en-US");
  return Number(value.toFixed(digits)).toString();
}

export function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return `${formatNumber(seconds * 1000, 0)} ms`;
  return `${formatNumber(seconds, 2)} s`;
}

export function formatBytes(bytes) {
  if (!bytes) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${formatNumber(value, 1)} ${units[unit]}`;
}

/** At most limit characters of text, saying how many more there were. */
export function clip(text, limit) {
  const value = String(text);
  if (value.length <= limit) return value;
  return `${value.slice(0, limit)}… (${value.length - limit} more characters)`;
}
