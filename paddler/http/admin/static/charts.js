// Live charts over the last 15 minutes, drawn as SVG from the chart points the
// management service streams (/api/v1/metrics/stream): the balancer samples its own
// metrics every couple of seconds, so no outside Prometheus is needed.

import { liveEvents } from "./api.js";
import { fill, formatNumber, h, svg } from "./dom.js";

const WIDTH = 640;
const HEIGHT = 210;
const LEFT = 52;
const RIGHT = 10;
const TOP = 12;
const BOTTOM = 28;
const MAX_POINTS = 1000;
const PALETTE = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2",
  "#ca8a04", "#db2777", "#4b5563", "#65a30d"];
const OUTCOME_COLORS = { done: "#16a34a", cancelled: "#6b7280", BufferOverflow: "#dc2626",
  BufferedRequestTimeout: "#ea580c", AgentLost: "#9333ea" };

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

/** The SVG of one chart: series = [{name, color, dashed, values: [[t, v], ...]}]. */
export function drawChart({ series, windowS, end, gapS, format }) {
  const start = end - windowS;
  const plotW = WIDTH - LEFT - RIGHT;
  const plotH = HEIGHT - TOP - BOTTOM;
  let max = 0;
  for (const one of series) {
    for (const [, value] of one.values) if (value !== null && value > max) max = value;
  }
  const top = niceMax(max);
  const x = (t) => LEFT + ((t - start) / windowS) * plotW;
  const y = (v) => TOP + plotH - (v / top) * plotH;
  const parts = [];
  for (const fraction of [0, 0.5, 1]) {
    const value = top * fraction;
    parts.push(svg("line", { x1: LEFT, x2: WIDTH - RIGHT, y1: y(value), y2: y(value),
      class: "grid" }));
    parts.push(svg("text", { x: LEFT - 6, y: y(value) + 4, class: "tick", "text-anchor": "end" },
      format(value)));
  }
  const step = windowS > 300 ? 300 : windowS > 60 ? 60 : 15;
  for (let ago = Math.floor(windowS / step) * step; ago >= 0; ago -= step) {
    const label = ago === 0 ? "now" : ago % 60 === 0 ? `−${ago / 60} min` : `−${ago} s`;
    parts.push(svg("text", { x: x(end - ago), y: HEIGHT - 8, class: "tick",
      "text-anchor": ago === 0 ? "end" : "middle" }, label));
  }
  let drawn = 0;
  for (const one of series) {
    let run = [];
    let previousT = null;
    const flush = () => {
      if (run.length === 1) {
        const [cx, cy] = run[0].split(",");
        parts.push(svg("circle", { cx, cy, r: 2, fill: one.color, class: "dot" }));
      } else if (run.length > 1) {
        parts.push(svg("polyline", { points: run.join(" "), stroke: one.color,
          class: one.dashed ? "series dashed" : "series" }));
      }
      run = [];
    };
    for (const [t, value] of one.values) {
      if (t < start) continue;
      if (value === null || (previousT !== null && t - previousT > gapS)) flush();
      if (value !== null) {
        run.push(`${x(t).toFixed(1)},${y(value).toFixed(1)}`);
        drawn += 1;
      }
      previousT = t;
    }
    flush();
  }
  const chart = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: "chart-svg",
    role: "img" }, parts);
  chart.dataset.points = String(drawn);
  chart.dataset.max = String(max);
  return chart;
}

function legend(series) {
  return h("ul", { class: "legend" }, series.map((one) => {
    const swatch = h("span", { class: one.dashed ? "swatch dashed" : "swatch" });
    swatch.style.backgroundColor = one.color;
    return h("li", {}, swatch, one.name);
  }));
}

const CHARTS = [
  {
    id: "tokens",
    title: "Output tokens/s",
    note: "counted when each request ends",
    format: (v) => formatNumber(v, 1),
    series: (points) => [{ name: "tokens/s", color: PALETTE[0],
      values: points.map((p) => [p.t, p.tokens_per_s]) }],
  },
  {
    id: "requests",
    title: "Requests/s by outcome",
    note: "finished requests",
    format: (v) => formatNumber(v, 2),
    series: (points) => {
      const outcomes = new Set();
      for (const point of points) for (const key of Object.keys(point.requests_per_s)) outcomes.add(key);
      if (!outcomes.size) outcomes.add("done");
      return [...outcomes].sort().map((outcome, index) => ({
        name: outcome,
        color: OUTCOME_COLORS[outcome] || PALETTE[(index + 2) % PALETTE.length],
        values: points.map((p) => [p.t, p.requests_per_s[outcome] || 0]),
      }));
    },
  },
  {
    id: "ttft",
    title: "Time to first token",
    note: "p50 and p99 of each sample's first tokens",
    format: (v) => (v >= 1000 ? `${formatNumber(v / 1000, 1)} s` : `${formatNumber(v, 0)} ms`),
    series: (points) => [
      { name: "p50", color: PALETTE[0],
        values: points.map((p) => [p.t, p.ttft_p50_s === null ? null : p.ttft_p50_s * 1000]) },
      { name: "p99", color: PALETTE[2],
        values: points.map((p) => [p.t, p.ttft_p99_s === null ? null : p.ttft_p99_s * 1000]) },
    ],
  },
  {
    id: "queue",
    title: "Queue depth",
    note: "buffered requests waiting for a slot",
    format: (v) => formatNumber(v, 1),
    series: (points) => [{ name: "buffered", color: PALETTE[4],
      values: points.map((p) => [p.t, p.buffered]) }],
  },
  {
    id: "slots",
    title: "Slots busy per agent",
    note: "dashed: slots of all agents",
    format: (v) => formatNumber(v, 1),
    series: (points) => {
      const names = new Set();
      for (const point of points) for (const agent of point.agents) names.add(agent.name);
      const perAgent = [...names].sort().slice(0, PALETTE.length * 3).map((name, index) => ({
        name,
        color: PALETTE[index % PALETTE.length],
        values: points.map((p) => {
          const agent = p.agents.find((a) => a.name === name);
          return [p.t, agent ? agent.busy : null];
        }),
      }));
      return [...perAgent, { name: "total slots", color: "#9ca3af", dashed: true,
        values: points.map((p) => [p.t, p.slots_total]) }];
    },
  },
];

function latestText(chart, points) {
  if (!points.length) return "no data yet";
  const series = chart.series(points.slice(-1));
  return series.filter((one) => !one.dashed).map((one) => {
    const value = one.values[0][1];
    return `${one.name} ${value === null ? "–" : chart.format(value)}`;
  }).join(" · ");
}

export function mountCharts(root, { setStatus }) {
  const controller = new AbortController();
  let points = [];
  let windowS = 900;
  let shownS = 900;
  let intervalS = 2;
  const boxes = new Map();
  const status = h("p", { class: "muted" }, "Connecting…");
  for (const chart of CHARTS) {
    boxes.set(chart.id, {
      plot: h("div", { class: "plot" }),
      latest: h("span", { class: "latest", "data-test": "latest" }),
      legend: h("div", {}),
    });
  }

  function render() {
    const end = points.length ? Math.max(points[points.length - 1].t, Date.now() / 1000 - 1)
      : Date.now() / 1000;
    for (const chart of CHARTS) {
      const box = boxes.get(chart.id);
      const series = chart.series(points);
      fill(box.plot, drawChart({ series, windowS: shownS, end, gapS: intervalS * 3,
        format: chart.format }));
      box.latest.textContent = latestText(chart, points);
      fill(box.legend, legend(series));
    }
    status.textContent = `${points.length} samples, one every ${intervalS} s, kept for ` +
      `${windowS / 60} minutes: the balancer samples its own metrics.`;
    for (const button of choices.children) {
      button.setAttribute("aria-pressed", button.dataset.seconds === String(shownS) ? "true" : "false");
    }
  }

  const choices = h("div", { class: "choices", role: "group", "aria-label": "time window" },
    [[900, "15 min"], [300, "5 min"], [60, "1 min"]].map(([seconds, label]) =>
      h("button", { type: "button", class: "secondary", dataset: { seconds: String(seconds) },
        onclick: () => { shownS = seconds; render(); } }, label)));

  fill(root,
    h("section", { class: "card" }, h("header", { class: "charts-head" }, h("h2", {}, "Live charts"),
      choices), status),
    h("div", { class: "charts" }, CHARTS.map((chart) => {
      const box = boxes.get(chart.id);
      return h("section", { class: "card chart", dataset: { chart: chart.id } },
        h("header", {}, h("h3", {}, chart.title), box.latest),
        box.plot, box.legend, h("p", { class: "muted small" }, chart.note));
    })));
  render();
  liveEvents("management", "/api/v1/metrics/stream", (value) => {
    if (typeof value.window_s === "number") {
      windowS = value.window_s;
      shownS = Math.min(shownS, windowS);
      intervalS = value.interval_s;
      points = [];
    }
    points = points.concat(value.points || []).slice(-MAX_POINTS);
    render();
  }, setStatus, controller.signal);
  const timer = setInterval(render, 5000); // the time axis moves on without samples too
  return { unmount: () => { controller.abort(); clearInterval(timer); } };
}
