// FeatureExplorer's view: a site x position grid (the last site at the top, as the lens draws read-outs) on a
// canvas; hover a cell for its top features (activation, DLA, read-out tokens); click a cell to list them,
// click a feature (or press Enter) to follow it: its site's cells where it is among the top features are
// outlined and listed. The data arrives packed (feature_data.py) and is inflated once per model run.

const FEATURE_ROW_H = 18;
const FEATURE_LABEL_W = 190;
const FEATURE_METRICS = { activation: "top feature's activation", dla: "DLA of the top features", l0: "active features (L0)" };
const FEATURE_SEQUENTIAL = palette(VIRIDIS);
const FEATURE_DIVERGENT = palette(DIVERGING);

// float16 bits -> number, through a table of all 65,536 values (built once).
let HALF = null;
function halfTable() {
  if (HALF) return HALF;
  HALF = new Float32Array(65536);
  for (let bits = 0; bits < 65536; bits++) {
    const sign = bits & 0x8000 ? -1 : 1, exp = (bits >> 10) & 0x1f, frac = bits & 0x3ff;
    HALF[bits] = exp === 0 ? sign * 2 ** -14 * (frac / 1024)
      : exp === 31 ? (frac ? NaN : sign * Infinity) : sign * 2 ** (exp - 15) * (1 + frac / 1024);
  }
  return HALF;
}

// The packed buffer (bytes, or base64 in a saved page) inflated and cut into its typed arrays.
async function unpack(raw, meta) {
  let bytes;
  if (typeof raw === "string") { // a saved page: base64 (a plain loop: Uint8Array.from with a callback is slow)
    const text = atob(raw);
    bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  }
  else if (raw && raw.buffer) bytes = new Uint8Array(raw.buffer, raw.byteOffset, raw.byteLength);
  else return null;
  if (!bytes.length || !meta.sections) return null;
  const inflated = new Uint8Array(await new Response(new Blob([bytes]).stream()
    .pipeThrough(new DecompressionStream("deflate"))).arrayBuffer());
  const kinds = { u1: Uint8Array, u2: Uint16Array, u4: Uint32Array, f2: Uint16Array };
  const out = {};
  for (const [name, [offset, length, dtype]] of Object.entries(meta.sections)) {
    const Kind = kinds[dtype];
    out[name] = new Kind(inflated.buffer.slice(offset, offset + length * Kind.BYTES_PER_ELEMENT));
  }
  // Feature ids were sent as differences within each site: add them up, and note where each site's start.
  out.siteStart = [];
  let at = 0;
  for (const n of meta.n_unique) {
    out.siteStart.push(at);
    for (let i = 1; i < n; i++) out.features[at + i] += out.features[at + i - 1];
    at += n;
  }
  out.vocab = new TextDecoder().decode(out.vocab).split("\0");
  return out;
}

function render({ model, el }) {
  const offline = model.get("offline") === true;
  const root = h("div", { class: "ll-root ll-features" });
  el.append(root);
  hideStatic(model.get("static_id"));

  const promptBox = h("input", { class: "ll-prompt", type: "text", placeholder: "prompt (Enter runs the model)" });
  const targetBox = h("input", { class: "ll-target", type: "text", placeholder: "target, e.g. ' Paris' or #1712" });
  const metric = h("select", { class: "ll-metric" },
    Object.entries(FEATURE_METRICS).map(([v, t]) => h("option", { value: v, text: t })));
  const zoom = h("input", { class: "ll-zoom", type: "range", min: 2, max: 120, title: "cell width" });
  const status = h("div", { class: "ll-status" });
  const labels = h("canvas", { class: "ll-labels" });
  const canvas = h("canvas", { class: "ll-cells" });
  const marks = h("div", { class: "ll-marks" });
  const scroll = h("div", { class: "ll-scroll" }, [h("div", { class: "ll-cellwrap" }, [canvas, marks])]);
  const legend = h("div", { class: "ll-legendbar ll-legend-text" });
  const popup = h("div", { class: "ll-popup" }, [h("em", { text: "click a cell for its top features" })]);
  const fires = h("div", { class: "ll-popup ll-fires" });
  const tooltip = h("div", { class: "ll-tooltip" });
  root.append(
    h("div", { class: "ll-bar" }, [promptBox, h("label", {}, ["target ", targetBox])]),
    h("div", { class: "ll-bar" }, [h("label", {}, ["colour ", metric]), h("label", {}, ["zoom ", zoom]),
      h("span", { class: "ll-export" }, [h("button", { text: "CSV", onclick: () => exportCsv() })])]),
    status, h("div", { class: "ll-panelbody" }, [labels, scroll]), legend,
    h("div", { class: "ll-bottom" }, [popup, fires]), tooltip,
  );
  const send = (name, value) => put(model, name, value);
  promptBox.addEventListener("keydown", (e) => { if (e.key === "Enter") send("prompt", promptBox.value); });
  targetBox.addEventListener("keydown", (e) => { if (e.key === "Enter") send("target", targetBox.value); });
  metric.addEventListener("change", () => send("metric", metric.value));
  zoom.addEventListener("input", () => send("zoom", Number(zoom.value)));
  canvas.tabIndex = 0;
  canvas.setAttribute("aria-label", "feature lens: arrow keys move the selected cell, Enter follows its top feature");

  // ---------------------------------------------------------------- data
  let d = null; // the unpacked arrays
  const meta = () => model.get("meta") || {};
  const S = () => (meta().labels || []).length;
  const P = () => (meta().positions || []).length;
  const cellW = () => model.get("zoom") || Math.max(2, Math.min(40, Math.floor(900 / Math.max(1, P()))));

  // The top features of cell (s, c): [{rank, feature, act, dla, readout: [texts]}], most active first.
  function cellFeatures(s, c) {
    const m = meta(), k = m.k, half = halfTable(), out = [];
    for (let j = 0; j < k; j++) {
      const i = (s * P() + c) * k + j, e = d.entry[i];
      if (e === m.empty) break;
      const u = d.siteStart[s] + e;
      const readout = [];
      for (let t = 0; t < m.n_readout; t++) readout.push(d.vocab[d.readout[u * m.n_readout + t]]);
      out.push({ rank: j, feature: d.features[u], act: half[d.act[i]], dla: d.dla ? half[d.dla[i]] : null, readout });
    }
    return out;
  }

  function cellValue(s, c, which) {
    const m = meta(), half = halfTable(), base = (s * P() + c) * m.k;
    if (which === "l0") return d.n_active[s * P() + c];
    if (which === "activation") return d.entry[base] === m.empty ? 0 : half[d.act[base]];
    let total = 0;
    for (let j = 0; j < m.k && d.entry[base + j] !== m.empty; j++) {
      const v = half[d.dla[base + j]];
      if (Number.isFinite(v)) total += v;
    }
    return total;
  }

  function which() {
    const w = model.get("metric");
    return w === "dla" && !(d && d.dla) ? "activation" : w;
  }

  // ---------------------------------------------------------------- drawing
  function draw() {
    const started = performance.now();
    sync();
    if (!d) return;
    const w = cellW(), n = S(), theme = themeOf(root), metricName = which();
    const ctx = canvasFor(canvas, P() * w, (n + 1) * FEATURE_ROW_H);
    let max = 1e-9;
    const values = new Float32Array(n * P());
    for (let s = 0; s < n; s++) for (let c = 0; c < P(); c++) {
      const v = cellValue(s, c, metricName);
      values[s * P() + c] = v;
      if (Math.abs(v) > max) max = Math.abs(v);
    }
    for (let s = 0; s < n; s++) {
      const y = (n - 1 - s) * FEATURE_ROW_H;
      for (let c = 0; c < P(); c++) {
        const v = values[s * P() + c];
        const colour = metricName === "dla" ? shade(FEATURE_DIVERGENT, 0.5 + v / (2 * max)) : shade(FEATURE_SEQUENTIAL, v / max);
        ctx.fillStyle = colour.css;
        ctx.fillRect(c * w, y, w - (w > 4 ? 1 : 0), FEATURE_ROW_H - 1);
      }
    }
    ctx.fillStyle = theme.fg;
    ctx.font = `11px ${theme.font}`;
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    if (w >= 12) meta().tokens.forEach((t, c) => ctx.fillText(clipText(ctx, visible(t), w - 2), c * w + w / 2, (n + 0.5) * FEATURE_ROW_H));
    const lctx = canvasFor(labels, FEATURE_LABEL_W, (n + 1) * FEATURE_ROW_H);
    lctx.font = `11px ${theme.font}`;
    lctx.textAlign = "right";
    lctx.textBaseline = "middle";
    lctx.fillStyle = theme.fg;
    meta().labels.forEach((label, s) => lctx.fillText(clipText(lctx, label, FEATURE_LABEL_W - 6), FEATURE_LABEL_W - 4, (n - 1 - s + 0.5) * FEATURE_ROW_H));
    legend.textContent = `${FEATURE_METRICS[metricName]}: ${metricName === "dla" ? fmt(-max, 3) + " … " + fmt(max, 3) : "0 … " + fmt(max, 3)}` +
      (meta().target ? ` · target ${visible(meta().target)}` : "");
    drawMarks();
    drawPopup();
    drawFires();
    timing("draw", performance.now() - started);
  }

  function box(s, c, cls) {
    const w = cellW();
    return h("div", { class: "ll-mark " + cls, style:
      `left:${c * w}px;top:${(S() - 1 - s) * FEATURE_ROW_H}px;width:${w - 1}px;height:${FEATURE_ROW_H - 1}px` });
  }

  // Where the followed feature is among its site's top features, and the selected cell, as outlines.
  function drawMarks() {
    const boxes = [];
    const f = model.get("feature") || {};
    for (const c of firing(f)) boxes.push(box(f.site, c.column, "ll-mark-pinned"));
    const sel = model.get("selection") || {};
    if (sel.site !== undefined) boxes.push(box(sel.site, meta().positions.indexOf(sel.position), "ll-mark-selected"));
    marks.replaceChildren(...boxes);
  }

  function firing(f) {
    if (!d || f.site === undefined) return [];
    const out = [];
    for (let c = 0; c < P(); c++) {
      const hit = cellFeatures(f.site, c).find((x) => x.feature === f.feature);
      if (hit) out.push({ column: c, act: hit.act, rank: hit.rank });
    }
    return out;
  }

  function featureLine(x) {
    const dla = x.dla === null ? "" : ` · DLA ${fmt(x.dla, 3)}`;
    return `#${x.feature} · act ${fmt(x.act, 3)}${dla} · → ${x.readout.map((t) => visible(t)).join(" ")}`;
  }

  function drawPopup() {
    const sel = model.get("selection") || {};
    if (!d || sel.site === undefined) return;
    const c = meta().positions.indexOf(sel.position);
    const items = cellFeatures(sel.site, c).map((x) => h("li", { class: "ll-feature", "data-feature": x.feature,
      title: "click to see where it fires", onclick: () => follow(sel.site, x.feature) }, [featureLine(x)]));
    popup.replaceChildren(
      h("div", { class: "ll-popup-title", text: `${meta().labels[sel.site]} · position ${sel.position} ${visible(meta().tokens[c])}` }),
      h("ol", { class: "ll-topk", start: 1 }, items));
  }

  function drawFires() {
    const f = model.get("feature") || {};
    if (!d || f.site === undefined) { fires.replaceChildren(); return; }
    const hits = firing(f);
    fires.replaceChildren(
      h("div", { class: "ll-popup-title", text: `feature #${f.feature} at ${meta().labels[f.site]}: among the top ${meta().k} at ${hits.length} of ${P()} positions` }),
      h("ul", { class: "ll-topk" }, hits.map((x) => h("li", { text:
        `position ${meta().positions[x.column]} ${visible(meta().tokens[x.column])}: act ${fmt(x.act, 3)} (rank ${x.rank + 1})` }))));
  }

  function follow(site, feature) {
    const started = performance.now();
    put(model, "feature", { site, feature });
    drawMarks();
    drawFires();
    timing("click", performance.now() - started);
  }

  // ---------------------------------------------------------------- events
  function cellAt(e) {
    const rect = canvas.getBoundingClientRect();
    const c = Math.floor((e.clientX - rect.left) / cellW());
    const row = Math.floor((e.clientY - rect.top) / FEATURE_ROW_H);
    if (!d || c < 0 || c >= P() || row < 0 || row >= S()) return null;
    return { s: S() - 1 - row, c };
  }

  function showTip(s, c, x, y) {
    const m = meta(), pos = m.positions[c];
    const rows = cellFeatures(s, c).map((f) => `<tr><td>#${f.feature}</td><td>${fmt(f.act, 3)}</td>` +
      (d.dla ? `<td>${fmt(f.dla, 3)}</td>` : "") +
      `<td class="ll-tok">${f.readout.map((t) => escapeHtml(visible(t))).join(" ")}</td></tr>`);
    const head = `<tr><td>feature</td><td>act</td>${d.dla ? "<td>DLA</td>" : ""}<td>read-out</td></tr>`;
    tooltip.innerHTML = `<b>${escapeHtml(m.labels[s])}</b> · position ${pos} <span class="ll-tok">` +
      `${escapeHtml(visible(m.tokens[c]))}</span><br>${d.n_active[s * P() + c]} active` +
      `<table>${head}${rows.join("")}</table>`;
    tooltip.style.display = "block";
    const width = tooltip.offsetWidth, height = tooltip.offsetHeight;
    tooltip.style.left = Math.max(0, Math.min(x + 14, root.clientWidth - width)) + "px";
    tooltip.style.top = Math.max(0, Math.min(y + 14, root.clientHeight - height)) + "px";
  }

  canvas.addEventListener("mousemove", (e) => {
    const started = performance.now();
    const cell = cellAt(e);
    if (!cell) { tooltip.style.display = "none"; return; }
    const r = root.getBoundingClientRect();
    showTip(cell.s, cell.c, e.clientX - r.left, e.clientY - r.top);
    timing("hover", performance.now() - started);
  });
  canvas.addEventListener("mouseleave", () => { tooltip.style.display = "none"; });
  canvas.addEventListener("blur", () => { tooltip.style.display = "none"; });
  canvas.addEventListener("click", (e) => {
    const started = performance.now();
    const cell = cellAt(e);
    if (!cell) return;
    put(model, "selection", { site: cell.s, position: meta().positions[cell.c] });
    drawMarks();
    drawPopup();
    timing("click", performance.now() - started);
  });
  // Keyboard access: arrows move the selected cell (up = a later site, as drawn), Enter follows its top feature.
  canvas.addEventListener("keydown", (e) => {
    const moves = { ArrowUp: [1, 0], ArrowDown: [-1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    if (!d || !(e.key in moves || e.key === "Enter")) return;
    e.preventDefault();
    const sel = model.get("selection") || {};
    let s = sel.site, c = sel.site === undefined ? -1 : meta().positions.indexOf(sel.position);
    if (s === undefined || c < 0) { s = S() - 1; c = P() - 1; } // start at the last site, last position
    else if (e.key === "Enter") {
      const top = cellFeatures(s, c)[0];
      if (top) follow(s, top.feature);
      return;
    } else {
      s = Math.max(0, Math.min(S() - 1, s + moves[e.key][0]));
      c = Math.max(0, Math.min(P() - 1, c + moves[e.key][1]));
    }
    put(model, "selection", { site: s, position: meta().positions[c] });
    drawMarks();
    drawPopup();
    const w = cellW(), left = c * w; // keep the cell in sight
    if (left < scroll.scrollLeft) scroll.scrollLeft = left;
    else if (left + w > scroll.scrollLeft + scroll.clientWidth) scroll.scrollLeft = left + w - scroll.clientWidth;
    const cb = canvas.getBoundingClientRect(), r = root.getBoundingClientRect();
    showTip(s, c, cb.left - r.left + (c + 1) * w, cb.top - r.top + (S() - s) * FEATURE_ROW_H);
  });

  function exportCsv() {
    const m = meta();
    const lines = ["site,position,token,rank,feature,activation" + (d.dla ? ",dla" : "") + ",readout"];
    for (let s = 0; s < S(); s++) for (let c = 0; c < P(); c++) for (const f of cellFeatures(s, c)) {
      const row = [m.labels[s], m.positions[c], m.tokens[c], f.rank, f.feature, f.act];
      if (d.dla) row.push(f.dla);
      row.push(f.readout.join(" "));
      lines.push(row.map(csvCell).join(","));
    }
    download("feature_lens.csv", lines.join("\n"), "text/csv");
  }

  function sync() {
    promptBox.value = model.get("prompt") || "";
    targetBox.value = model.get("target") || "";
    const fixed = offline || !model.get("live");
    promptBox.disabled = targetBox.disabled = fixed;
    if (fixed) promptBox.title = "a fixed result or a saved page: no model to run";
    metric.value = model.get("metric");
    zoom.value = cellW();
    root.classList.toggle("ll-busy", !!model.get("busy"));
    const error = model.get("error");
    status.textContent = error ? "error: " + error : model.get("status");
    status.classList.toggle("ll-error", !!error);
  }

  async function load() {
    const started = performance.now();
    d = await unpack(model.get("payload"), meta());
    timing("unpack", performance.now() - started);
    draw();
    const since = model.get("data_time");
    if (since) timing("render", Date.now() - since * 1000);
  }
  model.on("change:payload", load);
  for (const name of ["metric", "zoom"]) model.on("change:" + name, draw);
  model.on("change:selection", () => { drawMarks(); drawPopup(); });
  model.on("change:feature", () => { drawMarks(); drawFires(); });
  for (const name of ["busy", "status", "error", "prompt", "target"]) model.on("change:" + name, sync);
  sync();
  const stopWatchingTheme = watchTheme(draw);
  return load().then(() => {
    root.dataset.ready = "1";
    return stopWatchingTheme;
  });
}

export default { render };
