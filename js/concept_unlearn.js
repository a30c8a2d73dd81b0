// Concept Unlearn front end: live loss / progress on the training nodes, adapter metadata on the others.
// Everything is drawn on the canvas with fillText: metadata read from shared files is untrusted text and is
// never turned into HTML.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SUFFIX = "|ConceptUnlearn";
const EVENT = "concept_unlearn.progress";
const LINE = 15;
const MAX_LINES = 16;
const MAX_CHARS = 64;
const COLOURS = ["#4aa3ff", "#ff6b6b", "#5fd068", "#ffb347", "#c39bff"];

function clean(value) {
  // to a single printable line of bounded length (control characters removed)
  let text = typeof value === "string" ? value : JSON.stringify(value);
  text = String(text ?? "").replace(/[\u0000-\u001f\u007f]/g, " ");
  return text.length > MAX_CHARS ? text.slice(0, MAX_CHARS - 1) + "\u2026" : text;
}

function infoLines(info) {
  // the node's text comes from Python (nodes/host.py display_lines); here it is only bounded and drawn
  if (!info || !Array.isArray(info.lines)) return [];
  return info.lines.slice(0, MAX_LINES).map(clean);
}

function duration(seconds) {
  if (typeof seconds !== "number" || !isFinite(seconds)) return "";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  return `${Math.floor(seconds / 3600)} h ${String(Math.floor((seconds % 3600) / 60)).padStart(2, "0")} min`;
}

function drawProgress(node, ctx, top, width) {
  const p = node.__cuProgress;
  if (!p) return 0;
  ctx.save();
  ctx.fillStyle = "#222";
  ctx.fillRect(10, top, width, 8);
  ctx.fillStyle = "#4aa3ff";
  ctx.fillRect(10, top, width * Math.min(1, p.step / Math.max(1, p.total)), 8);
  ctx.fillStyle = "#ddd";
  ctx.font = "12px monospace";
  const losses = Object.entries(p.losses || {}).map(([k, v]) => `${clean(k)} ${v === null ? "nan" : Number(v).toPrecision(3)}`);
  const left = p.step < p.total && p.seconds_left > 0 ? `  ~${duration(p.seconds_left)} left` : "";
  ctx.fillText(`step ${p.step}/${p.total}${left}  ${losses.join("  ")}`.slice(0, 90), 10, top + 22);
  // sparkline of every loss term, each scaled to its own range
  const history = node.__cuHistory || [];
  const h = 40, y0 = top + 30;
  ctx.strokeStyle = "#444";
  ctx.strokeRect(10, y0, width, h);
  const names = history.length ? Object.keys(history[history.length - 1]) : [];
  names.forEach((name, i) => {
    const values = history.map((row) => row[name]).filter((v) => typeof v === "number");
    if (values.length < 2) return;
    const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
    ctx.strokeStyle = COLOURS[i % COLOURS.length];
    ctx.beginPath();
    values.forEach((v, j) => {
      const x = 10 + (width * j) / (values.length - 1);
      const y = y0 + h - (h * (v - lo)) / span;
      j ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
    });
    ctx.stroke();
  });
  ctx.restore();
  return 30 + h + 6;
}

function drawInfo(node, ctx, top) {
  const lines = node.__cuLines || [];
  if (!lines.length) return 0;
  ctx.save();
  ctx.fillStyle = "#bbb";
  ctx.font = "12px monospace";
  lines.forEach((line, i) => ctx.fillText(line, 10, top + LINE * (i + 1)));
  ctx.restore();
  return LINE * lines.length + 6;
}

function extraHeight(node) {
  return (node.__cuProgress ? 82 : 0) + (node.__cuLines?.length ? LINE * node.__cuLines.length + 10 : 0);
}

function fit(node) {
  node.setSize([node.size[0], node.computeSize()[1]]);
  node.setDirtyCanvas(true, true);
}

// A canvas-drawn widget that reserves room for the live values below the node's inputs; not serialized.
function liveWidget(owner) {
  return {
    name: "concept_unlearn_live",
    type: "concept_unlearn_live",
    value: "",
    serialize: false,
    options: { serialize: false },
    draw(ctx, node, width, y) {
      const used = drawProgress(node, ctx, y + 4, width - 20);
      drawInfo(node, ctx, y + 4 + used);
    },
    computeSize(width) {
      return [width, extraHeight(owner)];
    },
  };
}

function nodeById(id) {
  if (id === null || id === undefined) return null;
  return app.graph?.getNodeById(Number(id)) ?? app.graph?.getNodeById(id) ?? null;
}

// A node that starts running again shows nothing until its new result arrives (not the previous run's text).
function clearNode(node) {
  if (!node || !node.type?.endsWith(SUFFIX)) return;
  node.__cuLines = [];
  node.__cuProgress = null;
  node.__cuHistory = [];
  fit(node);
}

// Seeds of new nodes start "fixed": queueing an unchanged graph again is then served from ComfyUI's cache
// instead of training again (the front end's own default for seed widgets is "randomize").
function fixSeedControl(node) {
  for (const widget of node.widgets || []) {
    if (widget.name === "control_after_generate") widget.value = "fixed";
  }
}

app.registerExtension({
  name: "ConceptUnlearn.UI",

  setup() {
    api.addEventListener("executing", ({ detail }) => {
      const id = detail !== null && typeof detail === "object" ? (detail.display_node ?? detail.node) : detail;
      clearNode(nodeById(id));
    });
    api.addEventListener(EVENT, ({ detail }) => {
      if (!detail || detail.node === null || detail.node === undefined) return;
      const node = nodeById(detail.node);
      if (!node) return;
      if (!node.__cuProgress || detail.step <= 1) node.__cuHistory = [];
      node.__cuHistory.push(detail.losses || {});
      const first = !node.__cuProgress;
      node.__cuProgress = detail;
      if (first) fit(node);
      node.setDirtyCanvas(true, true);
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.endsWith(SUFFIX)) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      fixSeedControl(this);  // a workflow being loaded sets its saved value afterwards (configure)
      this.addCustomWidget(liveWidget(this));
      return result;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const info = message?.concept_unlearn?.[0];
      this.__cuLines = infoLines(info);
      fit(this);
    };
  },
});
