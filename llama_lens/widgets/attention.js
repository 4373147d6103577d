// AttentionExplorer's view: head grid (thumbnails open a head), the open head's heatmap (queries down, keys
// across) with a hover tooltip, and the prompt as text coloured by one query's attention.

const LINE_H = 24; // px per line of the prompt's text (.ll-line in widgets.css)
const MIN_CELL = 10; // px: the smallest default cell, the smallest that has its tokens written beside it
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
  const places = placeCache(), tip = tooltipPlacer(tooltip, root); // hovering reads no layout
  promptBox.addEventListener("keydown", (e) => { if (e.key === "Enter") put(model, "prompt", promptBox.value); });
  layersBox.addEventListener("keydown", (e) => {
    if (e.key !== "Enter") return;
    const layers = layersBox.value.split(/[ ,]+/).filter(Boolean).map(Number);
    put(model, "layers", layers);
  });
  zoom.addEventListener("input", () => put(model, "zoom", Number(zoom.value)));

  // ---------------------------------------------------------------- data
  // The kernel sends every shown head's thumbnail; the page asks for a head's full pattern when it opens it
  // (attention_explorer.answer), showing its thumbnail enlarged meanwhile. A saved page has them all.
  let thumbBytes = new Uint8Array(0); // every shown head's thumbnail: lower triangles of sqrt(weight) x 255
  let heads = new Map(); // "layer:head" -> Uint16Array lower triangle (weight x 65535), the full patterns held
  let asked = new Set(); // the heads asked for since the data came
  let thumbs = null; // "layer:head" -> its thumbnail's element, drawn once per data (and theme)
  let lines = null; // the prompt laid out in lines of the text box's width: [[{pos, text}, ...], ...]
  let shownLines = ""; // the lines in the page ("first:last"), rebuilt on scroll or resize only
  let spans = []; // the shown lines' spans; hovering only recolours them
  let shownText = null; // the (layer, head, query, full) the text is coloured for
  function bytesOf(raw) {
    if (typeof raw === "string") return fromBase64(raw, "u1");
    if (raw && raw.buffer) return new Uint8Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength));
    return new Uint8Array(0);
  }
  const words = (raw) => { const b = bytesOf(raw); return new Uint16Array(b.buffer, 0, b.byteLength >> 1); };
  function decode() {
    thumbs = null;
    lines = null;
    shownLines = "";
    spans = [];
    shownText = null;
    heads = new Map();
    asked = new Set();
    thumbBytes = bytesOf(model.get("thumbs"));
    const all = model.get("patterns"); // a saved page: every shown head
    if (all) {
      const every = words(all), size = tri();
      meta().layers.forEach((layer, i) => {
        for (let head = 0; head < meta().n_heads; head++) {
          const at = (i * meta().n_heads + head) * size;
          heads.set(`${layer}:${head}`, every.subarray(at, at + size));
        }
      });
    }
  }
  // Asks the kernel for the open head's pattern, once, unless the page has it (a saved page has no kernel).
  function askOpen() {
    const { layer, head } = model.get("head"), key = `${layer}:${head}`;
    if (offline || heads.has(key) || asked.has(key)) return;
    asked.add(key);
    model.send({ want: "head", layer, head, run: meta().run });
  }
  // A head's pattern from the kernel (a binary buffer; base64 `pattern` where there are none), unless it is
  // about older data; the open head is drawn at once.
  function receive(reply, buffers) {
    if (!reply || reply.want !== "head" || reply.run !== meta().run || reply.stale) return;
    if (reply.error) { status.textContent = "error: " + reply.error; return; }
    const raw = buffers && buffers.length ? buffers[0] : reply.pattern;
    heads.set(`${reply.layer}:${reply.head}`, words(raw));
    const { layer, head } = model.get("head");
    if (reply.layer !== layer || reply.head !== head) return; // an answer overtaken by a newer click
    drawHeatmap();
    drawText(model.get("query"));
    if (opening) timing("open", performance.now() - opening);
    opening = 0;
  }
  model.on("msg:custom", receive);
  let opening = 0; // when the open head was clicked, until its pattern is drawn
  const meta = () => model.get("meta") || { tokens: [], layers: [], n_heads: 0, thumb: 1 };
  const n = () => meta().tokens.length;
  const tri = () => (n() * (n() + 1)) / 2;
  // The pattern of a (layer, head) as a function of (q, k), or null until the kernel has sent it: the offsets
  // worked out once, not per pixel (a 300-token heatmap reads 90,000 weights).
  function headWeights(layer, head) {
    const w = heads.get(`${layer}:${head}`);
    if (!w) return null;
    return (q, k) => (k > q ? 0 : w[(q * (q + 1)) / 2 + k] / 65535);
  }
  const weight = (layer, head, q, k) => { const f = headWeights(layer, head); return f ? f(q, k) : NaN; };
  // Cells of at least MIN_CELL px by default, so each has its tokens written beside it (a 300-token prompt's
  // heatmap scrolls; the zoom slider goes down to 1 px for the whole picture at once).
  const cellSize = () => model.get("zoom") || Math.max(MIN_CELL, Math.min(24, Math.floor(560 / Math.max(1, n()))));

  // A thumbnail: side x side blocks, each the brightest weight of its block of positions (already as the colour's
  // index), above the diagonal the background.
  function thumbImage(layer, head, colour) {
    const side = Math.max(1, meta().thumb || 1), size = (side * (side + 1)) / 2;
    const base = (meta().layers.indexOf(layer) * meta().n_heads + head) * size;
    const img = new ImageData(side, side);
    for (let q = 0; q < side; q++) for (let k = 0; k < side; k++) {
      const c = k > q ? colour.masked : WEIGHT_COLOURS[thumbBytes[base + (q * (q + 1)) / 2 + k] || 0].rgb;
      const o = (q * side + k) * 4;
      img.data[o] = c[0]; img.data[o + 1] = c[1]; img.data[o + 2] = c[2]; img.data[o + 3] = 255;
    }
    return img;
  }

  // The full pattern of a head, N x N pixels.
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
        small.width = small.height = Math.max(1, meta().thumb || 1);
        small.getContext("2d").putImageData(thumbImage(layer, head, colour), 0, 0);
        ctx.imageSmoothingEnabled = false;
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
    places.clear(); // the heatmap's size, and what is above it, may change
    const { layer, head } = model.get("head");
    const N = n(), s = cellSize(), theme = themeOf(root);
    const labels = s >= MIN_CELL ? 70 : 0;
    const ctx = canvasFor(heatmap, labels + N * s, labels + N * s);
    const full = !!headWeights(layer, head), side = full ? Math.max(1, N) : Math.max(1, meta().thumb || 1);
    const small = document.createElement("canvas");
    small.width = small.height = side;
    const colour = { masked: masked() };
    small.getContext("2d").putImageData(full ? image(layer, head, colour) : thumbImage(layer, head, colour), 0, 0);
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
    const waiting = offline ? "the thumbnail: the full pattern needs the kernel"
      : "the thumbnail until the kernel sends the full pattern";
    title.textContent = `layer ${layer}, head ${head}: queries down, keys across (colour: √weight)` +
      (full ? "" : ` (${waiting})`);
    return full;
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
    const weightOf = headWeights(layer, head); // null until the open head's pattern has come: no colours
    const key = `${layer}:${head}:${query}:${!!weightOf}`;
    if (shownText === key) return;
    shownText = key;
    let max = 1e-9;
    if (query >= 0 && weightOf) for (let k = 0; k <= query; k++) max = Math.max(max, weightOf(query, k));
    for (const span of spans) {
      const k = Number(span.dataset.pos);
      const w = query >= 0 && k <= query && weightOf ? weightOf(query, k) : 0;
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
  heatmap.addEventListener("mouseenter", () => places.clear()); // the page may have moved since the last visit
  heatmap.addEventListener("mousemove", (e) => {
    const started = performance.now();
    const rect = places.of(heatmap);
    const labels = Number(heatmap.dataset.labels || 0), s = cellSize();
    const k = Math.floor((e.clientX - rect.left - labels) / s), q = Math.floor((e.clientY - rect.top - labels) / s);
    if (q < 0 || k < 0 || q >= n() || k >= n()) { tooltip.style.display = "none"; return; }
    const { layer, head } = model.get("head");
    const tokens = meta().tokens;
    tooltip.innerHTML = `query ${q} <span class="ll-tok">${escapeHtml(visible(tokens[q]))}</span> → key ${k} ` +
      `<span class="ll-tok">${escapeHtml(visible(tokens[k]))}</span><br>weight <b>${k > q ? "masked" : fmt(weight(layer, head, q, k), 4)}</b>`;
    tooltip.style.display = "block";
    const box = places.of(root);
    tip.place(e.clientX - box.left, e.clientY - box.top);
    timing("hover", performance.now() - started);
    frameTiming("hover_frame", started);
  });
  heatmap.addEventListener("mouseleave", () => { tooltip.style.display = "none"; });
  heatmap.addEventListener("click", (e) => {
    const started = performance.now();
    const rect = places.of(heatmap);
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
    frameTiming("hover_frame", started);
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

  // The exports need the open head's full pattern; until it has come they say so instead.
  function notYet() {
    const { layer, head } = model.get("head");
    if (headWeights(layer, head)) return false;
    status.textContent = `layer ${layer}, head ${head}: the full pattern has not come yet`;
    return true;
  }

  function exportCsv() {
    if (notYet()) return;
    const { layer, head } = model.get("head");
    const tokens = meta().tokens;
    const lines = ["layer,head,query,query_token,key,key_token,weight"];
    for (let q = 0; q < n(); q++) for (let k = 0; k <= q; k++) {
      lines.push([layer, head, q, tokens[q], k, tokens[k], weight(layer, head, q, k)].map(csvCell).join(","));
    }
    download(`attention_L${layer}H${head}.csv`, lines.join("\n"), "text/csv");
  }

  function exportSvg() {
    if (notYet()) return;
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
    askOpen();
  }
  // New data (a prompt, other layers): everything is drawn anew.
  model.on("change:thumbs", () => {
    full();
    const since = model.get("data_time");
    if (since) timing("render", Date.now() - since * 1000);
  });
  // Opening a head moves the grid's outline and draws the head: at once from its pattern when the page has it,
  // else from its thumbnail until the kernel's answer comes ("open" is timed to the full pattern drawn).
  model.on("change:head", () => {
    const started = performance.now();
    sync();
    drawGrid();
    const full = drawHeatmap();
    drawText(model.get("query"));
    timing(full ? "open" : "open_thumb", performance.now() - started);
    opening = full ? 0 : started;
    askOpen();
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
    model.off("msg:custom", receive);
    if (resizing) resizing.disconnect();
    places.stop();
    tip.stop();
  };
}

export default { render };
