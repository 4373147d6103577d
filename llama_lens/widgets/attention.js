// AttentionExplorer's view: head grid (thumbnails open a head), the open head's heatmap (queries down, keys
// across) with a hover tooltip, and the prompt as text coloured by one query's attention.

const LINE_H = 24; // px per line of the prompt's text (.ll-line in widgets.css)
// The heatmaps' colours in 256 steps: a look-up per pixel, not a colour made per pixel (120 thumbnails of 300
// tokens are ten million pixels).
const WEIGHT_COLOURS = palette(VIRIDIS);

function render({ model, el }) {
  const offline = model.get("offline") === true;
  const root = h("div", { class: "ll-root ll-attention" });
  el.append(root);
  hideStatic(model.get("static_id"));

  const promptBox = h("input", { class: "ll-prompt", type: "text", placeholder: "prompt (Enter runs the model)" });
  const layersBox = h("input", { class: "ll-layers", type: "text", title: "layers to show, e.g. 0, 3, 5" });
  const zoom = h("input", { class: "ll-zoom", type: "range", min: 1, max: 64, title: "cell size" });
  const status = h("div", { class: "ll-status" });
  const grid = h("div", { class: "ll-grid" });
  const heatmap = h("canvas", { class: "ll-att-canvas" });
  const scroll = h("div", { class: "ll-scroll" }, [heatmap]);
  const title = h("div", { class: "ll-title" });
  const lineBox = h("div", { class: "ll-lines" });
  const text = h("div", { class: "ll-text" }, [lineBox]);
  const textTitle = h("div", { class: "ll-title" });
  const tooltip = h("div", { class: "ll-tooltip" });
  root.append(
    h("div", { class: "ll-bar" }, [promptBox]),
    h("div", { class: "ll-bar" }, [
      h("label", {}, ["layers ", layersBox]), h("label", {}, ["zoom ", zoom]),
      h("span", { class: "ll-export" }, [
        h("button", { text: "PNG", onclick: () => heatmap.toBlob((b) => download("attention.png", b)) }),
        h("button", { text: "SVG", onclick: () => exportSvg() }),
        h("button", { text: "CSV", onclick: () => exportCsv() }),
      ]),
    ]),
    status, grid,
    h("div", { class: "ll-att-main" }, [h("div", { class: "ll-panel" }, [title, scroll]), h("div", {}, [textTitle, text])]),
    tooltip,
  );
  if (offline) promptBox.disabled = layersBox.disabled = true;
  promptBox.addEventListener("keydown", (e) => { if (e.key === "Enter") put(model, "prompt", promptBox.value); });
  layersBox.addEventListener("keydown", (e) => {
    if (e.key !== "Enter") return;
    const layers = layersBox.value.split(/[ ,]+/).filter(Boolean).map(Number);
    put(model, "layers", layers);
  });
  zoom.addEventListener("input", () => put(model, "zoom", Number(zoom.value)));

  // ---------------------------------------------------------------- data
  let words = null; // Uint16Array of every shown layer's heads' lower triangles
  let thumbs = null; // "layer:head" -> its thumbnail's element, drawn once per data (and theme)
  let lines = null; // the prompt laid out in lines of the text box's width: [[{pos, text}, ...], ...]
  let shownLines = ""; // the lines in the page ("first:last"), rebuilt on scroll or resize only
  let spans = []; // the shown lines' spans; hovering only recolours them
  let shownText = null; // the (layer, head, query) the text is coloured for
  function decode() {
    thumbs = null;
    lines = null;
    shownLines = "";
    spans = [];
    shownText = null;
    const raw = model.get("patterns");
    if (typeof raw === "string") {
      const bytes = Uint8Array.from(atob(raw), (c) => c.charCodeAt(0));
      words = new Uint16Array(bytes.buffer);
    } else if (raw && raw.buffer) {
      words = new Uint16Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength));
    } else {
      words = new Uint16Array(0);
    }
  }
  const meta = () => model.get("meta") || { tokens: [], layers: [], n_heads: 0 };
  const n = () => meta().tokens.length;
  const tri = () => (n() * (n() + 1)) / 2;
  // The pattern of a (layer, head) as a function of (q, k): the offsets worked out once, not per pixel (a
  // 300-token thumbnail reads 90,000 weights, and 30 layers of heads thousands of times that).
  function headWeights(layer, head) {
    const base = (meta().layers.indexOf(layer) * meta().n_heads + head) * tri();
    return (q, k) => (k > q ? 0 : words[base + (q * (q + 1)) / 2 + k] / 65535);
  }
  const weight = (layer, head, q, k) => headWeights(layer, head)(q, k);
  const cellSize = () => model.get("zoom") || Math.max(1, Math.min(24, Math.floor(560 / Math.max(1, n()))));

  function image(layer, head, colour) {
    const N = n(), weight = headWeights(layer, head);
    const img = new ImageData(Math.max(1, N), Math.max(1, N));
    for (let q = 0; q < N; q++) for (let k = 0; k < N; k++) {
      // sqrt, so small weights stay visible (as the matplotlib figure's gamma 0.5).
      const c = k > q ? colour.masked : shade(WEIGHT_COLOURS, Math.sqrt(weight(q, k))).rgb;
      const o = (q * N + k) * 4;
      img.data[o] = c[0]; img.data[o + 1] = c[1]; img.data[o + 2] = c[2]; img.data[o + 3] = 255;
    }
    return img;
  }

  function masked() {
    const bg = getComputedStyle(root).backgroundColor.match(/\d+/g) || [255, 255, 255];
    return bg.slice(0, 3).map(Number);
  }

  // ---------------------------------------------------------------- drawing
  // Opening a head only moves the outline: the thumbnails are drawn when the data (or the theme) changes.
  function drawGrid() {
    const started = performance.now();
    const open = model.get("head");
    if (thumbs) {
      for (const [name, thumb] of thumbs) thumb.classList.toggle("ll-open", name === `${open.layer}:${open.head}`);
      timing("grid", performance.now() - started);
      return;
    }
    thumbs = new Map();
    grid.replaceChildren();
    const colour = { masked: masked() };
    for (const layer of meta().layers) {
      for (let head = 0; head < meta().n_heads; head++) {
        const canvas = h("canvas");
        const size = 64;
        const ctx = canvasFor(canvas, size, size);
        const small = document.createElement("canvas");
        small.width = small.height = Math.max(1, n());
        small.getContext("2d").putImageData(image(layer, head, colour), 0, 0);
        ctx.imageSmoothingEnabled = n() > size;
        ctx.drawImage(small, 0, 0, size, size);
        const isOpen = open.layer === layer && open.head === head;
        const thumb = h("div", { class: "ll-thumb" + (isOpen ? " ll-open" : ""), "data-layer": layer, "data-head": head,
          title: `layer ${layer}, head ${head}: click to open`,
          onclick: () => { put(model, "head", { layer, head }); } }, [canvas, `L${layer} H${head}`]);
        thumbs.set(`${layer}:${head}`, thumb);
        grid.append(thumb);
      }
    }
    timing("grid", performance.now() - started);
  }

  function drawHeatmap() {
    const { layer, head } = model.get("head");
    const N = n(), s = cellSize(), theme = themeOf(root);
    const labels = s >= 10 ? 70 : 0;
    const ctx = canvasFor(heatmap, labels + N * s, labels + N * s);
    const small = document.createElement("canvas");
    small.width = small.height = Math.max(1, N);
    small.getContext("2d").putImageData(image(layer, head, { masked: masked() }), 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(small, labels, labels, N * s, N * s);
    if (labels) {
      ctx.fillStyle = theme.fg;
      ctx.font = `${Math.min(12, s - 1)}px ${theme.font}`;
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      meta().tokens.forEach((t, i) => ctx.fillText(clipText(ctx, visible(t), labels - 4), labels - 3, labels + (i + 0.5) * s));
      ctx.save();
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left";
      meta().tokens.forEach((t, i) => ctx.fillText(clipText(ctx, visible(t), labels - 4), -labels + 3, labels + (i + 0.5) * s));
      ctx.restore();
    }
    const q = model.get("query");
    if (q >= 0) {
      ctx.strokeStyle = theme.accent;
      ctx.lineWidth = 2;
      ctx.strokeRect(labels, labels + q * s, N * s, s);
    }
    heatmap.dataset.labels = labels;
    title.textContent = `layer ${layer}, head ${head}: queries down, keys across (colour: √weight)`;
  }

  // The prompt as text, wrapped at the box's width by measuring each token in the box's font, so that only the
  // lines in sight are in the page (300 tokens: a few dozen spans). Newlines show as ↵ and end the line; a token
  // wider than the box is cut into pieces.
  function layoutText() {
    const width = Math.max(60, (text.clientWidth || 560) - 12);
    const style = getComputedStyle(text);
    const ctx = document.createElement("canvas").getContext("2d");
    ctx.font = `${style.fontSize || "13px"} ${style.fontFamily || "monospace"}`;
    lines = [[]];
    let x = 0;
    meta().tokens.forEach((token, pos) => {
      let rest = String(token).replace(/\n/g, "\u21b5");
      while (rest) {
        let piece = rest, w = ctx.measureText(piece).width;
        if (x + w > width && x > 0) { lines.push([]); x = 0; continue; }
        while (w > width && piece.length > 1) { piece = piece.slice(0, -1); w = ctx.measureText(piece).width; }
        lines[lines.length - 1].push({ pos, text: piece });
        x += w;
        rest = rest.slice(piece.length);
        if (rest) { lines.push([]); x = 0; }
      }
      if (String(token).includes("\n")) { lines.push([]); x = 0; }
    });
    lineBox.style.height = lines.length * LINE_H + "px";
    shownLines = "";
  }

  // Puts the lines in sight (and two either side) in the page; called on data, scroll and resize.
  function showLines() {
    if (!lines) layoutText();
    const first = Math.max(0, Math.floor(text.scrollTop / LINE_H) - 2);
    const last = Math.min(lines.length, Math.ceil((text.scrollTop + (text.clientHeight || 400)) / LINE_H) + 2);
    if (shownLines === `${first}:${last}`) return;
    shownLines = `${first}:${last}`;
    spans = [];
    const rows = [];
    for (let i = first; i < last; i++) {
      const row = lines[i].map((piece) => h("span", { "data-pos": piece.pos, text: piece.text }));
      spans.push(...row);
      rows.push(h("div", { class: "ll-line", style: `top:${i * LINE_H}px` }, row));
    }
    lineBox.replaceChildren(...rows);
    shownText = null;
    drawText(shownQuery);
  }

  // Colours the shown spans by one query's attention (-1: none).
  let shownQuery = -1;
  function drawText(query) {
    const { layer, head } = model.get("head");
    const tokens = meta().tokens;
    shownQuery = query;
    if (!lines) { showLines(); return; }
    const key = `${layer}:${head}:${query}`;
    if (shownText === key) return;
    shownText = key;
    let max = 1e-9;
    if (query >= 0) for (let k = 0; k <= query; k++) max = Math.max(max, weight(layer, head, query, k));
    for (const span of spans) {
      const k = Number(span.dataset.pos);
      const w = query >= 0 && k <= query ? weight(layer, head, query, k) : 0;
      const c = ramp(VIRIDIS, w / max);
      span.title = query >= 0 ? `key ${k}: weight ${fmt(w, 4)} from query ${query}` : "";
      const coloured = query >= 0 && k <= query && w > 0;
      span.style.background = coloured ? rgb(c) : "";
      span.style.color = coloured ? inkOn(c) : "";
      span.classList.toggle("ll-query", k === query);
    }
    textTitle.textContent = query >= 0
      ? `attention from query ${query} ${visible(tokens[query])} (hover a token to preview, click to fix)`
      : "hover or click a token";
  }

  // ---------------------------------------------------------------- events
  heatmap.addEventListener("mousemove", (e) => {
    const started = performance.now();
    const rect = heatmap.getBoundingClientRect();
    const labels = Number(heatmap.dataset.labels || 0), s = cellSize();
    const k = Math.floor((e.clientX - rect.left - labels) / s), q = Math.floor((e.clientY - rect.top - labels) / s);
    if (q < 0 || k < 0 || q >= n() || k >= n()) { tooltip.style.display = "none"; return; }
    const { layer, head } = model.get("head");
    const tokens = meta().tokens;
    tooltip.innerHTML = `query ${q} <span class="ll-tok">${escapeHtml(visible(tokens[q]))}</span> → key ${k} ` +
      `<span class="ll-tok">${escapeHtml(visible(tokens[k]))}</span><br>weight <b>${k > q ? "masked" : fmt(weight(layer, head, q, k), 4)}</b>`;
    tooltip.style.display = "block";
    const box = root.getBoundingClientRect();
    tooltip.style.left = e.clientX - box.left + 14 + "px";
    tooltip.style.top = e.clientY - box.top + 14 + "px";
    timing("hover", performance.now() - started);
  });
  heatmap.addEventListener("mouseleave", () => { tooltip.style.display = "none"; });
  heatmap.addEventListener("click", (e) => {
    const started = performance.now();
    const rect = heatmap.getBoundingClientRect();
    const labels = Number(heatmap.dataset.labels || 0);
    const q = Math.floor((e.clientY - rect.top - labels) / cellSize());
    if (q >= 0 && q < n()) { model.set("query", q); model.save_changes(); drawHeatmap(); drawText(q); }
    timing("click", performance.now() - started);
  });
  text.addEventListener("mouseover", (e) => {
    const pos = e.target.dataset && e.target.dataset.pos;
    if (pos === undefined) return;
    const started = performance.now();
    drawText(Number(pos));
    timing("hover", performance.now() - started);
  });
  text.addEventListener("mouseleave", () => drawText(model.get("query")));
  text.addEventListener("scroll", showLines);
  // A new width wraps the text anew (JupyterLab's panel resized, a side bar opened).
  let textWidth = 0;
  const resizing = typeof ResizeObserver === "undefined" ? null : new ResizeObserver(() => {
    if (text.clientWidth === textWidth) return;
    textWidth = text.clientWidth;
    lines = null;
    showLines();
  });
  if (resizing) resizing.observe(text);
  text.addEventListener("click", (e) => {
    const pos = e.target.dataset && e.target.dataset.pos;
    if (pos === undefined) return;
    put(model, "query", Number(pos));
  });

  function exportCsv() {
    const { layer, head } = model.get("head");
    const tokens = meta().tokens;
    const lines = ["layer,head,query,query_token,key,key_token,weight"];
    for (let q = 0; q < n(); q++) for (let k = 0; k <= q; k++) {
      lines.push([layer, head, q, tokens[q], k, tokens[k], weight(layer, head, q, k)].map(csvCell).join(","));
    }
    download(`attention_L${layer}H${head}.csv`, lines.join("\n"), "text/csv");
  }

  function exportSvg() {
    const { layer, head } = model.get("head");
    const N = n(), s = Math.max(4, cellSize());
    const parts = [];
    for (let q = 0; q < N; q++) for (let k = 0; k <= q; k++) {
      parts.push(`<rect x="${k * s}" y="${q * s}" width="${s}" height="${s}" fill="${rgb(ramp(VIRIDIS, Math.sqrt(weight(layer, head, q, k))))}"/>`);
    }
    download(`attention_L${layer}H${head}.svg`,
      `<svg xmlns="http://www.w3.org/2000/svg" width="${N * s}" height="${N * s}">${parts.join("")}</svg>`, "image/svg+xml");
  }

  function sync() {
    const prompt = model.get("prompt");
    promptBox.value = Array.isArray(prompt) ? prompt.map((m) => `${m.role}: ${m.content}`).join(" | ") : prompt || "";
    promptBox.disabled = offline || Array.isArray(prompt) || prompt === "";
    layersBox.value = meta().layers.join(", ");
    zoom.value = cellSize();
    root.classList.toggle("ll-busy", !!model.get("busy"));
    const error = model.get("error");
    status.textContent = error ? "error: " + error : model.get("status");
    status.classList.toggle("ll-error", !!error);
  }

  function full() {
    const started = performance.now();
    decode();
    sync();
    drawGrid();
    drawHeatmap();
    drawText(model.get("query"));
    timing("draw", performance.now() - started);
  }
  model.on("change:patterns", () => {
    full();
    const since = model.get("data_time");
    if (since) timing("render", Date.now() - since * 1000);
  });
  model.on("change:head", () => {
    const started = performance.now();
    sync();
    drawGrid();
    drawHeatmap();
    drawText(model.get("query"));
    timing("open", performance.now() - started);
  });
  model.on("change:query", () => { drawHeatmap(); drawText(model.get("query")); });
  model.on("change:zoom", () => { sync(); drawHeatmap(); });
  for (const name of ["busy", "status", "error", "prompt"]) model.on("change:" + name, sync);
  full();
  const since = model.get("data_time"); // the first picture, from the data's making in the kernel
  if (since) timing("render", Date.now() - since * 1000);
  const stopWatchingTheme = watchTheme(full);
  root.dataset.ready = "1";
  return () => {
    stopWatchingTheme();
    if (resizing) resizing.disconnect();
  };
}

export default { render };
