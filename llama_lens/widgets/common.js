// Shared by the explorers: element helpers, colour maps, theme, downloads and timings.
// Plain JavaScript, no dependencies: this file is concatenated in front of each explorer's script.

function h(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
  }
  for (const child of [].concat(children)) if (child) node.append(child);
  return node;
}

// Token text made visible: spaces as a middle dot, newlines and tabs as escapes.
function visible(text) {
  return String(text).replace(/ /g, "\u00b7").replace(/\n/g, "\\n").replace(/\t/g, "\\t");
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (Math.abs(value) > 0 && Math.abs(value) < 10 ** -digits) return value.toExponential(1);
  return Number(value).toFixed(digits);
}

// Viridis, sampled at 9 stops (from matplotlib's table), interpolated linearly.
const VIRIDIS = [
  [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
  [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
];
// The other colour maps a lens explorer offers, 9 stops each from matplotlib's tables.
const COLORMAPS = {
  viridis: VIRIDIS,
  magma: [[0, 0, 4], [29, 17, 71], [81, 18, 124], [131, 38, 129], [183, 55, 121], [231, 82, 99], [252, 137, 97],
    [254, 196, 136], [252, 253, 191]],
  cividis: [[0, 34, 78], [26, 56, 111], [67, 78, 108], [97, 101, 111], [125, 124, 120], [155, 148, 118],
    [188, 174, 108], [222, 201, 88], [254, 232, 56]],
  greys: [[255, 255, 255], [240, 240, 240], [217, 217, 217], [189, 189, 189], [149, 149, 149], [114, 114, 114],
    [81, 81, 81], [36, 36, 36], [0, 0, 0]],
  blues: [[247, 251, 255], [222, 235, 247], [198, 219, 239], [157, 202, 225], [106, 174, 214], [65, 145, 198],
    [32, 112, 180], [8, 80, 155], [8, 48, 107]],
};
const DIVERGING = [[33, 102, 172], [103, 169, 207], [209, 229, 240], [247, 247, 247], [253, 219, 199],
  [239, 138, 98], [178, 24, 43]];

function ramp(stops, t) {
  t = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0));
  const x = t * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const f = x - i;
  return stops[i].map((c, j) => Math.round(c + (stops[i + 1][j] - c) * f));
}

// 256 steps of a colour map as CSS strings, with the text colour that reads on each: drawing thousands of
// cells then costs a table look-up per cell, not a string built per cell.
function palette(stops) {
  const out = [];
  for (let i = 0; i < 256; i++) {
    const c = ramp(stops, i / 255);
    out.push({ css: rgb(c), ink: inkOn(c), rgb: c });
  }
  return out;
}

function shade(table, t) {
  return table[Math.round(Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0)) * 255)];
}

function rgb(c) {
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

// Black or white text, whichever reads better on the colour c.
function inkOn(c) {
  return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 150 ? "#000" : "#fff";
}

// The front-end's colours (JupyterLab's CSS variables, VS Code's, or the page's), read off the root element.
function themeOf(root) {
  const style = getComputedStyle(root);
  return { fg: style.color || "#222", bg: style.backgroundColor, muted: style.getPropertyValue("--ll-muted") || "#888",
    accent: style.getPropertyValue("--ll-accent") || "#e8590c", font: style.fontFamily || "sans-serif" };
}

function download(name, data, type) {
  const blob = data instanceof Blob ? data : new Blob([data], { type });
  const url = URL.createObjectURL(blob);
  const link = h("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function csvCell(value) {
  const text = String(value ?? "");
  return /[",\n\r]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
}

// Handling times, read by tests and by anyone curious: window.llamaLensTimings.hover etc. (milliseconds).
function timing(kind, ms) {
  const all = (window.llamaLensTimings = window.llamaLensTimings || {});
  (all[kind] = all[kind] || []).push(ms);
}

// Hides this explorer's static picture (shown where no widget front-end runs) with a rule in the page's head,
// so that a picture added to the page after the view rendered is hidden too.
function hideStatic(id) {
  if (!id || document.getElementById("llama-lens-hide-" + id)) return;
  const rule = `.llama-lens-static-${id} { display: none !important; }`;
  document.head.append(h("style", { id: "llama-lens-hide-" + id, text: rule }));
}

// Sets a synced value and sends it to the kernel.
function put(model, name, value) {
  model.set(name, value);
  model.save_changes();
}

function canvasFor(canvas, width, height) {
  // Sharp on high-density screens, within the browsers' canvas size limit and 16 million pixels (a 300-token
  // attention heatmap of 10 px cells is 3,070 px a side: at a density of 2, 150 MB of pixels otherwise).
  const dpr = Math.max(1, Math.min(window.devicePixelRatio || 1, 32000 / Math.max(width, height, 1),
    Math.sqrt(16e6 / Math.max(1, width * height))));
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  canvas.style.width = width + "px";
  canvas.style.height = height + "px";
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  return ctx;
}

function clipText(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let n = text.length;
  while (n > 1 && ctx.measureText(text.slice(0, n) + "…").width > width) n--;
  return n > 1 ? text.slice(0, n) + "…" : "";
}

// Calls `redraw` when the front-end's theme changes (JupyterLab marks <body>; elsewhere the system's dark mode),
// so the canvases take its colours; returns the function that stops watching (render's clean-up).
function watchTheme(redraw) {
  const themeWatch = new MutationObserver(() => redraw());
  themeWatch.observe(document.body, { attributes: true, attributeFilter: ["data-jp-theme-light", "data-jp-theme-name"] });
  const scheme = window.matchMedia ? window.matchMedia("(prefers-color-scheme: dark)") : null;
  if (scheme) scheme.addEventListener("change", redraw);
  return () => {
    themeWatch.disconnect();
    if (scheme) scheme.removeEventListener("change", redraw);
  };
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

// base64 of little-endian binary (what Python's `lens_data._pack` writes) -> a typed array of `dtype`
// ("u1", "u2", "u4" or "f4"). Every browser in use is little-endian, so the bytes are the array's own.
function fromBase64(text, dtype) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  const Type = { u1: Uint8Array, u2: Uint16Array, u4: Uint32Array, f4: Float32Array }[dtype];
  return new Type(bytes.buffer, 0, bytes.length / Type.BYTES_PER_ELEMENT);
}

// Where elements are on the screen, read once and kept until something scrolls or is resized (or `clear()`, when
// the pointer comes in or the view redraws). Reading a place in every mousemove makes the browser lay the whole
// page out whenever anything in it changed since the last frame: in JupyterLab tens of milliseconds a hover.
function placeCache() {
  let rects = new Map();
  const clear = () => { rects = new Map(); };
  window.addEventListener("scroll", clear, true); // capture: a scrolling panel's event does not bubble
  window.addEventListener("resize", clear);
  return {
    of(element) {
      let rect = rects.get(element);
      if (!rect) rects.set(element, (rect = element.getBoundingClientRect()));
      return rect;
    },
    clear,
    stop() { window.removeEventListener("scroll", clear, true); window.removeEventListener("resize", clear); },
  };
}

// Places a tooltip beside the pointer, inside the explorer's box (a notebook's output area cuts off what hangs
// below it), without making the browser lay the page out in the event: the box's and the tooltip's sizes are
// kept from ResizeObserver's reports (after the browser's own layout), and a new size moves the tooltip again.
function tooltipPlacer(tooltip, root) {
  let tipSize = null, rootSize = null, at = null;
  const fit = () => {
    if (!at) return;
    // Until the first report (the tooltip's first showing), beside the pointer; the report moves it inside.
    const w = tipSize ? tipSize.w : 0, h = tipSize ? tipSize.h : 0, box = rootSize || { w: Infinity, h: Infinity };
    tooltip.style.left = Math.max(0, Math.min(at.x + 14, box.w - w)) + "px";
    tooltip.style.top = Math.max(0, Math.min(at.y + 14, box.h - h)) + "px";
  };
  const watch = typeof ResizeObserver === "undefined" ? null : new ResizeObserver(() => {
    if (tooltip.offsetWidth > 0) tipSize = { w: tooltip.offsetWidth, h: tooltip.offsetHeight };
    rootSize = { w: root.clientWidth, h: root.clientHeight };
    fit();
  });
  if (watch) { watch.observe(tooltip); watch.observe(root); }
  return {
    place(x, y) {
      at = { x, y };
      if (!watch) { // no ResizeObserver: measured here (which lays the page out)
        rootSize = { w: root.clientWidth, h: root.clientHeight };
        tipSize = { w: tooltip.offsetWidth, h: tooltip.offsetHeight };
      }
      fit();
    },
    stop() { if (watch) watch.disconnect(); },
  };
}

// Records `kind` as the time from `started` to the next frame drawn (the event's work, the browser's layout and
// paint of what it changed): what the eye waits for, beside the handler's own time.
function frameTiming(kind, started) {
  if (typeof requestAnimationFrame === "undefined") return;
  requestAnimationFrame(() => setTimeout(() => timing(kind, performance.now() - started), 0));
}
