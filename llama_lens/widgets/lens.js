// LogitLensExplorer's view: the controls, a heatmap per panel (read-outs up, positions across) on a canvas, its
// hover tooltip, clicks and keys. The data comes with each model run (the `panels` trait) and, for what that frame
// left out, as the view needs it (lens_parts.js); the cells' values and colours are lens_values.js's, the top-k
// list and the pins' chart lens_pins.js's, the SVG and CSV text lens_export.js's.

const ROW_H = 18;
const LABEL_W = 64;
const METRIC_NAMES = {
  prob: "top-1 probability", logit: "top-1 logit (raw)", target_prob: "target probability", target_rank: "target rank",
  token_prob: "token probability", token_rank: "token rank", entropy: "entropy (nats)", kl: "KL to final (nats)",
};


function render({ model, el }) {
  const offline = model.get("offline") === true;
  const root = h("div", { class: "ll-root ll-lens" });
  el.append(root);
  hideStatic(model.get("static_id"));

  // ---------------------------------------------------------------- controls
  const promptBox = h("input", { class: "ll-prompt", type: "text", placeholder: "prompt (Enter runs the model)" });
  const compareBox = h("input", { class: "ll-prompt ll-compare", type: "text", placeholder: "second prompt" });
  const readout = h("select", { class: "ll-readout" },
    ["resid_post", "resid_pre", "resid_mid"].map((r) => h("option", { value: r, text: r })));
  const lens = h("select", { class: "ll-lens-kind", title: "logit lens, or the tuned lens's translators" },
    ["logit", "tuned"].map((v) => h("option", { value: v, text: v })));
  const lensLabel = h("label", {}, ["lens ", lens]);
  const targetBox = h("input", { class: "ll-target", type: "text", placeholder: "target, e.g. ' Paris' or #1712" });
  const tokenBox = h("input", { class: "ll-token", type: "text", placeholder: "colour token" });
  const metric = h("select", { class: "ll-metric" },
    Object.entries(METRIC_NAMES).map(([v, t]) => h("option", { value: v, text: t })));
  const stride = h("input", { class: "ll-stride", type: "number", min: 1, max: 64, title: "show every n-th read-out" });
  const zoom = h("input", { class: "ll-zoom", type: "range", min: 6, max: 160, title: "cell width" });
  const diff = h("input", { class: "ll-diff", type: "checkbox" });
  const colormap = h("select", { class: "ll-colormap", title: "colour map" },
    Object.keys(COLORMAPS).map((v) => h("option", { value: v, text: v })));
  const trajectory = h("select", { class: "ll-trajectory" },
    ["prob", "rank"].map((v) => h("option", { value: v, text: "chart: " + v })));
  const hint = h("span", { class: "ll-hint" });
  const status = h("div", { class: "ll-status" });
  const buttons = h("span", { class: "ll-export" }, [
    h("button", { text: "PNG", title: "save the heatmap as PNG", onclick: () => exportPng() }),
    h("button", { text: "SVG", title: "save the heatmap as SVG", onclick: () => exportSvg() }),
    h("button", { text: "CSV", title: "save the table as CSV", onclick: () => exportCsv() }),
    h("button", { text: "fit", title: "fit all positions in the width", onclick: () => fit() }),
  ]);
  const diffLabel = h("label", { class: "ll-difflabel" }, [diff, " difference"]);
  root.append(
    h("div", { class: "ll-bar" }, [promptBox, compareBox]),
    h("div", { class: "ll-bar" }, [
      h("label", {}, ["read-out ", readout]), lensLabel, h("label", {}, ["target ", targetBox]), hint,
      h("label", {}, ["colour ", metric]), colormap, h("label", {}, ["token ", tokenBox]),
    ]),
    h("div", { class: "ll-bar" }, [
      h("label", {}, ["stride ", stride]), h("label", {}, ["zoom ", zoom]), diffLabel, trajectory, buttons,
    ]),
    status,
  );
  const panelsBox = h("div", { class: "ll-panels" });
  const legend = h("canvas", { class: "ll-legend" });
  const legendText = h("span", { class: "ll-legend-text" });
  const popup = h("div", { class: "ll-popup" }, [h("em", { text: "click a cell for its top tokens" })]);
  const chart = h("div", { class: "ll-chart" });
  const tooltip = h("div", { class: "ll-tooltip" });
  root.append(panelsBox, h("div", { class: "ll-legendbar" }, [legend, legendText]),
    h("div", { class: "ll-bottom" }, [popup, chart]), tooltip);
  const places = placeCache(), placer = tooltipPlacer(tooltip, root); // hovering reads no layout
  if (offline) {
    for (const box of [promptBox, compareBox, readout, lens, targetBox, tokenBox]) box.disabled = true;
    promptBox.title = "a saved page has no kernel to run the model";
  }

  const send = (name, value) => put(model, name, value);
  promptBox.addEventListener("keydown", (e) => { if (e.key === "Enter") send("prompt", promptBox.value); });
  compareBox.addEventListener("keydown", (e) => {
    if (e.key === "Enter") send("compare_prompt", compareBox.value || null);
  });
  readout.addEventListener("change", () => send("readout", readout.value));
  lens.addEventListener("change", () => send("lens", lens.value));
  targetBox.addEventListener("keydown", (e) => { if (e.key === "Enter") send("target", targetBox.value); });
  tokenBox.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { send("token", tokenBox.value); send("metric", "token_prob"); }
  });
  metric.addEventListener("change", () => send("metric", metric.value));
  colormap.addEventListener("change", () => send("colormap", colormap.value));
  stride.addEventListener("change", () => send("stride", Math.max(1, Math.min(64, parseInt(stride.value) || 1))));
  zoom.addEventListener("input", () => send("zoom", Number(zoom.value)));
  diff.addEventListener("change", () => send("diff", diff.checked));
  trajectory.addEventListener("change", () => send("trajectory", trajectory.value));

  // ---------------------------------------------------------------- data access
  let views = []; // per panel: {canvas, labels, scroll, rows, colX}
  let tip = null; // the tooltip's cell and place, shown again when its top-k arrives
  let csvWanted = false; // the CSV button waits for the metrics its table holds
  const { panels, ask, askColumns, stop } = lensPanels(model, offline, (reply, error) => {
    if (error) {
      status.textContent = "error: " + error;
      status.classList.add("ll-error");
    } else if (reply.want === "metric") {
      redraw();
      if (csvWanted) exportCsv();
    } else {
      if (tip && tip.p === reply.panel && tip.cell.c >= reply.start && tip.cell.c < reply.stop) {
        showTip(tip.p, tip.cell, tip.x, tip.y);
      }
      drawPopup();
      drawChart();
    }
  });
  const rowsShown = (R) => {
    const s = model.get("stride") || 1;
    const rows = [];
    for (let r = 0; r < R; r++) if (r % s === 0 || r === R - 1) rows.push(r);
    return rows.reverse(); // the last read-out at the top
  };

  const { value, missingData, scale, partner, colourOf } = lensValues(model, panels, offline);

  // ---------------------------------------------------------------- drawing
  function draw() {
    const started = performance.now();
    const ps = panels();
    const theme = themeOf(root);
    places.clear(); // new canvases, and the page below the controls may move
    panelsBox.replaceChildren();
    views = [];
    const titles = model.get("titles") || [];
    const sc = scale();
    const cellW = model.get("zoom") || 36;
    ps.forEach((d, p) => {
      const R = d.labels.length, P = d.positions.length;
      const rows = rowsShown(R);
      const width = P * cellW;
      const height = (rows.length + 2) * ROW_H; // + next-token strip on top, input tokens below
      const canvas = h("canvas", { class: "ll-cells", "data-panel": p });
      const labels = h("canvas", { class: "ll-rowlabels" });
      const marks = h("div", { class: "ll-marks" });
      const scroll = h("div", { class: "ll-scroll" }, [h("div", { class: "ll-cellwrap" }, [canvas, marks])]);
      const box = h("div", { class: "ll-panel" }, [
        h("div", { class: "ll-title", text: titles[p] || "" }),
        h("div", { class: "ll-panelbody" }, [labels, scroll]),
      ]);
      panelsBox.append(box);
      const ctx = canvasFor(canvas, width, height);
      ctx.font = `${Math.min(12, Math.max(8, cellW / 3.2))}px ${theme.font}`;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      // Next token (what the model should predict at each position) on top.
      ctx.fillStyle = theme.muted;
      for (let c = 0; c < P; c++) {
        const next = d.tokens[d.positions[c] + 1];
        if (next !== undefined && cellW >= 14) ctx.fillText(clipText(ctx, visible(next), cellW - 2), (c + 0.5) * cellW, ROW_H / 2);
      }
      const clipped = new Map(); // vocab index -> its text clipped to the cell
      rows.forEach((r, y) => {
        for (let c = 0; c < P; c++) {
          const colour = colourOf(p, r, c, sc);
          const x = c * cellW, top = (y + 1) * ROW_H;
          ctx.fillStyle = colour ? colour.css : theme.bg || "#eee";
          ctx.fillRect(x, top, cellW - (cellW > 8 ? 1 : 0), ROW_H - 1);
          if (cellW >= 20 && colour) {
            const v = d.top[(r * P + c) * d.k];
            if (!clipped.has(v)) clipped.set(v, clipText(ctx, visible(d.vocab[v]), cellW - 3));
            ctx.fillStyle = colour.ink;
            ctx.fillText(clipped.get(v), x + cellW / 2, top + ROW_H / 2);
          }
        }
      });
      // Input tokens at the bottom (click to pin a position).
      const bottom = (rows.length + 1) * ROW_H;
      ctx.fillStyle = theme.fg;
      if (cellW >= 12) {
        for (let c = 0; c < P; c++) {
          ctx.fillText(clipText(ctx, visible(d.tokens[d.positions[c]]), cellW - 2), c * cellW + cellW / 2, bottom + ROW_H / 2);
        }
      }
      // Row labels, fixed at the left while the cells scroll.
      const lctx = canvasFor(labels, LABEL_W, height);
      lctx.font = `11px ${theme.font}`;
      lctx.textAlign = "right";
      lctx.textBaseline = "middle";
      lctx.fillStyle = theme.fg;
      rows.forEach((r, y) => lctx.fillText(d.labels[r], LABEL_W - 4, (y + 1.5) * ROW_H));
      lctx.fillStyle = theme.muted;
      lctx.fillText("next", LABEL_W - 4, ROW_H / 2);
      lctx.fillText("input", LABEL_W - 4, bottom + ROW_H / 2);
      views.push({ canvas, scroll, marks, rows, cellW, d, p });
      canvas.addEventListener("mouseenter", () => places.clear()); // the page may have moved since the last visit
      canvas.addEventListener("mousemove", (e) => hover(e, p));
      canvas.addEventListener("mouseleave", () => { tooltip.style.display = "none"; tip = null; });
      canvas.addEventListener("click", (e) => click(e, p));
      canvas.tabIndex = 0;
      canvas.setAttribute("aria-label", `${titles[p] || "logit lens"}: arrow keys move the selected cell, Enter pins its top token`);
      canvas.addEventListener("keydown", (e) => key(e, p));
      canvas.addEventListener("blur", () => { tooltip.style.display = "none"; tip = null; });
      scroll.addEventListener("scroll", () => askShown(views[p]));
    });
    const which = model.get("metric");
    if (which === "logit" || which === "entropy" || which === "kl") {
      ps.forEach((d, p) => { if (!d.metrics[which]) ask(p, { want: "metric", metric: which }); });
    }
    views.forEach(askShown);
    drawLegend(sc);
    drawMarks();
    drawPopup();
    drawChart();
    timing("draw", performance.now() - started);
  }

  // The clicked cell and the pinned positions, as outlines over the canvas: moving them redraws no cell.
  function drawMarks() {
    const selection = model.get("selection") || {};
    const pinned = new Set(model.get("pinned_positions") || []);
    for (const view of views) {
      const { d, rows, cellW, p } = view;
      const boxes = [];
      d.positions.forEach((pos, c) => {
        if (!pinned.has(pos)) return;
        boxes.push(h("div", { class: "ll-mark ll-mark-pinned", style:
          `left:${c * cellW}px;top:${ROW_H}px;width:${cellW - 1}px;height:${(rows.length + 1) * ROW_H - 1}px` }));
      });
      if (selection.panel === p && rows.includes(selection.row)) {
        const c = d.positions.indexOf(selection.position);
        boxes.push(h("div", { class: "ll-mark ll-mark-selected", style:
          `left:${c * cellW}px;top:${(rows.indexOf(selection.row) + 1) * ROW_H}px;width:${cellW - 1}px;height:${ROW_H - 1}px` }));
      }
      view.marks.replaceChildren(...boxes);
    }
  }

  function drawLegend(sc) {
    const ctx = canvasFor(legend, 240, 12);
    const divergent = model.get("diff") && panels().length === 2;
    for (let x = 0; x < 240; x++) {
      ctx.fillStyle = rgb(divergent ? ramp(DIVERGING, x / 239) : ramp(COLORMAPS[model.get("colormap")] || VIRIDIS, x / 239));
      ctx.fillRect(x, 0, 1, 12);
    }
    const which = model.get("metric");
    const name = METRIC_NAMES[which];
    const missing = missingData(which);
    legendText.textContent = missing ? ` ${name}: ${missing}` : divergent
      ? ` ${name}: panel 2 higher ← → panel 1 higher (shared scale)`
      : ` ${name}: ${sc.rank ? "rank " + sc.label[0] : fmt(sc.label[0], 2)} … ${sc.rank ? "rank 0" : fmt(sc.label[1], 2)}`;
  }

  // The top-k of the positions in sight and a block beyond, asked for as the panel scrolls (not on hover).
  function askShown(view) {
    const first = Math.floor(view.scroll.scrollLeft / view.cellW);
    const last = Math.ceil((view.scroll.scrollLeft + (view.scroll.clientWidth || 0)) / view.cellW);
    askColumns(view.p, first, last + BLOCK);
  }

  function cellAt(e, p) {
    const view = views[p];
    const rect = places.of(view.canvas);
    const x = e.clientX - rect.left, y = e.clientY - rect.top;
    const c = Math.floor(x / view.cellW);
    const yRow = Math.floor(y / ROW_H) - 1;
    if (c < 0 || c >= view.d.positions.length) return null;
    if (yRow === view.rows.length) return { c, input: true };
    if (yRow < 0 || yRow >= view.rows.length) return null;
    return { c, r: view.rows[yRow] };
  }

  // The first n of a cell's top-k; null (and asked for) where its position's top-k has not come.
  function topList(p, r, c, n) {
    const d = panels()[p];
    if (n > 1 && !d.have[c]) {
      askColumns(p, c, c + 1);
      return null;
    }
    const base = (r * d.P + c) * d.k;
    const out = [];
    for (let j = 0; j < Math.min(n, d.k); j++) {
      const v = d.top[base + j];
      out.push({ text: d.vocab[v], id: d.vocab_ids[v], prob: d.probs[base + j] / d.prob_scale });
    }
    return out;
  }

  function hover(e, p) {
    const started = performance.now();
    const cell = cellAt(e, p);
    if (!cell) { tooltip.style.display = "none"; return; }
    const box = places.of(root);
    showTip(p, cell, e.clientX - box.left, e.clientY - box.top);
    timing("hover", performance.now() - started);
    frameTiming("hover_frame", started);
  }

  // The tooltip of a cell at (x, y) in the explorer's box.
  function showTip(p, cell, x, y) {
    const d = views[p].d;
    const pos = d.positions[cell.c];
    let html;
    if (cell.input) {
      html = `<b>position ${pos}</b> input ${escapeHtml(visible(d.tokens[pos]))}<br><i>click to pin this position</i>`;
    } else {
      const which = model.get("metric");
      const v = value(p, cell.r, cell.c);
      let line = `${METRIC_NAMES[which]}: <b>${which.endsWith("rank") ? (v ?? "–") : fmt(v, 4)}</b>`;
      const other = model.get("diff") ? partner(p, cell.c) : null;
      if (other) {
        const w = value(other[0], cell.r, other[1]);
        line += ` (other panel ${which.endsWith("rank") ? (w ?? "–") : fmt(w, 4)})`;
      }
      const list = topList(p, cell.r, cell.c, d.k);
      const rows = list ? list.map((t, j) =>
        `<tr><td>${j + 1}</td><td class="ll-tok">${escapeHtml(visible(t.text))}</td><td>${fmt(t.prob, 3)}</td></tr>`)
        : ["<tr><td><i>top tokens: loading…</i></td></tr>"];
      html = `<b>${escapeHtml(d.labels[cell.r])}</b> · position ${pos} ${escapeHtml(visible(d.tokens[pos]))}<br>` +
        `top ${escapeHtml(visible(d.vocab[d.top[(cell.r * d.positions.length + cell.c) * d.k]]))} · ${line}` +
        `<table>${rows.join("")}</table>`;
    }
    tooltip.innerHTML = html;
    tooltip.style.display = "block";
    tip = { p, cell, x, y };
    // Inside the explorer's box: a notebook's output area cuts off what hangs below it (the top-20 list did).
    placer.place(x, y);
  }

  function click(e, p) {
    const started = performance.now();
    const cell = cellAt(e, p);
    if (!cell) return;
    const d = views[p].d;
    const pos = d.positions[cell.c];
    if (cell.input) {
      const pinned = new Set(model.get("pinned_positions") || []);
      const adding = !pinned.has(pos);
      adding ? pinned.add(pos) : pinned.delete(pos);
      model.set("pinned_positions", [...pinned].sort((a, b) => a - b));
      if (adding) {
        // The token the last read-out predicts there, followed across read-outs.
        const top = topList(p, d.labels.length - 1, cell.c, 1)[0];
        addPin(p, pos, top.id, false);
      }
      model.save_changes();
      drawChart();
    } else {
      put(model, "selection", { panel: p, row: cell.r, position: pos });
      drawPopup();
    }
    drawMarks();
    timing("click", performance.now() - started);
  }

  // Keyboard access: arrows move the selected cell (up = a later read-out, as drawn), Enter pins its top token.
  function key(e, p) {
    const view = views[p];
    const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    if (!view || !(e.key in moves || e.key === "Enter")) return;
    e.preventDefault();
    const { d, rows, cellW } = view;
    const s = model.get("selection") || {};
    let y = s.panel === p ? rows.indexOf(s.row) : -1;
    let c = s.panel === p ? d.positions.indexOf(s.position) : -1;
    if (y < 0 || c < 0) { y = 0; c = d.positions.length - 1; } // start at the last read-out, last position
    else if (e.key in moves) {
      y = Math.max(0, Math.min(rows.length - 1, y + moves[e.key][0]));
      c = Math.max(0, Math.min(d.positions.length - 1, c + moves[e.key][1]));
    }
    const r = rows[y], pos = d.positions[c];
    if (e.key === "Enter" && s.panel === p && s.row === r && s.position === pos) {
      addPin(p, pos, topList(p, r, c, 1)[0].id, e.shiftKey);
      model.save_changes();
      drawChart();
      return;
    }
    put(model, "selection", { panel: p, row: r, position: pos });
    drawMarks();
    drawPopup();
    const left = c * cellW, scroll = view.scroll; // keep the cell in sight
    if (left < scroll.scrollLeft) scroll.scrollLeft = left;
    else if (left + cellW > scroll.scrollLeft + scroll.clientWidth) scroll.scrollLeft = left + cellW - scroll.clientWidth;
    places.clear(); // scrolled just now
    const canvasBox = places.of(view.canvas), box = places.of(root);
    showTip(p, { c, r }, canvasBox.left - box.left + (c + 1) * cellW, canvasBox.top - box.top + (y + 2) * ROW_H);
  }

  const { addPin, drawPopup, drawChart } = lensPins({ model, panels, topList, popup, chart, tokenBox, redraw: () => draw() });

  // ---------------------------------------------------------------- export
  function exportPng() {
    const view = views[0];
    if (!view) return;
    view.canvas.toBlob((blob) => download("logit_lens.png", blob));
  }

  function exportSvg() {
    const ps = panels();
    if (!ps.length) return;
    const d = ps[0], sc = scale();
    const cells = (r, c) => colourOf(0, r, c, sc);
    download("logit_lens.svg", lensSvg(d, rowsShown(d.labels.length), cells, model.get("zoom") || 36), "image/svg+xml");
  }

  function exportCsv() {
    // A live page asks for the metrics it has not got and writes the table when they come.
    const missing = offline ? [] : panels().flatMap((d, p) => ["entropy", "kl"].filter((m) => !d.metrics[m]).map((m) => [p, m]));
    csvWanted = missing.length > 0;
    if (csvWanted) {
      for (const [p, metric] of missing) ask(p, { want: "metric", metric });
      return;
    }
    const lines = lensCsvLines(panels(), model.get("target_data") || {});
    download("logit_lens.csv", lines.join("\n"), "text/csv");
  }

  function fit() {
    const d = panels()[0];
    if (!d) return;
    const width = Math.max(200, root.clientWidth - LABEL_W - 24) / (panels().length > 1 ? 2 : 1);
    const w = Math.max(6, Math.min(160, Math.floor(width / d.positions.length)));
    send("zoom", w);
  }

  // ---------------------------------------------------------------- syncing
  function syncControls() {
    const prompt = model.get("prompt");
    const chat = Array.isArray(prompt);
    promptBox.value = chat ? prompt.map((m) => `${m.role}: ${m.content}`).join(" | ") : prompt;
    promptBox.disabled = offline || chat;
    const compare = model.get("compare_prompt");
    compareBox.style.display = compare === null || compare === undefined ? "none" : "";
    compareBox.value = compare === null || compare === undefined ? "" : Array.isArray(compare) ? "(chat)" : compare;
    diffLabel.style.display = panels().length === 2 ? "" : "none";
    readout.value = model.get("readout");
    lens.value = model.get("lens");
    lensLabel.style.display = model.get("has_tuned_lens") ? "" : "none";  // a switch only with a tuned lens
    targetBox.value = model.get("target");
    tokenBox.value = model.get("token");
    metric.value = model.get("metric");
    colormap.value = model.get("colormap") || "viridis";
    stride.value = model.get("stride");
    zoom.value = model.get("zoom");
    diff.checked = model.get("diff");
    trajectory.value = model.get("trajectory");
    root.classList.toggle("ll-busy", !!model.get("busy"));
    const error = model.get("error");
    status.textContent = error ? "error: " + error : model.get("status");
    status.classList.toggle("ll-error", !!error);
    const th = model.get("target_data") || {};
    hint.replaceChildren();
    if (th.hint) {
      const typed = th.hint.rank_typed === null ? "is not one token" : `ranks ${th.hint.rank_typed}`;
      hint.append(`'${model.get("target")}' ${typed}; did you mean `,
        h("a", { href: "#", text: `'${th.hint.text}'`, onclick: (e) => {
          e.preventDefault(); send("target", th.hint.text);
        } }), ` (rank ${th.hint.rank})?`);
    }
  }

  const redraw = () => { syncControls(); draw(); };
  const firstDraw = () => {
    redraw();
    const since = model.get("data_time");
    if (since) timing("render", Date.now() - since * 1000);
  };
  const names = ["panels", "target_data", "token_data", "metric", "colormap", "stride", "zoom", "diff", "titles"];
  for (const name of names) model.on("change:" + name, name === "panels" ? firstDraw : redraw);
  model.on("change:selection", () => { drawMarks(); drawPopup(); });
  model.on("change:pinned_positions", drawMarks);
  model.on("change:traces", drawChart);
  model.on("change:pins", drawChart);
  model.on("change:trajectory", () => { syncControls(); drawChart(); });
  for (const name of ["busy", "status", "error", "prompt", "compare_prompt", "readout", "lens", "target", "token"]) {
    model.on("change:" + name, syncControls);
  }
  firstDraw();
  const stopWatchingTheme = watchTheme(redraw);
  root.dataset.ready = "1";
  return () => {
    stopWatchingTheme();
    stop();
    places.stop();
    placer.stop();
  };
}

export default { render };
