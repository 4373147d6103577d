// GraphExplorer's view: the pruned attribution graph as an SVG node-link diagram, layers up the y axis
// (embeddings at the bottom, logits at the top) and positions along the x axis (the prompt's tokens).
// Hover (or focus) a node for its read-out and activating contexts; click (or Enter) pins it, and the
// "pinned" view keeps the pinned nodes with their neighbours; shift-click (or Space) selects nodes, which
// "group" merges into a supernode (edges to the outside summed); "export" downloads circuit-tracer's graph
// JSON with the pins and supernodes in its qParams. Pins, selection and supernodes are synced traits.

const SVG_NS = "http://www.w3.org/2000/svg";
const GRAPH_ROW_H = 46;
const GRAPH_LABEL_W = 54;
const GRAPH_NODE_GAP = 15;
const GRAPH_CT_TYPES = { feature: "cross layer transcoder", error: "mlp reconstruction error", embedding: "embedding", logit: "logit" };

function svg(tag, attrs = {}, classes = []) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  for (const c of classes) node.classList.add(c);
  return node;
}

// The drawn graph: real nodes not in a supernode, and supernodes; edges summed between what is drawn.
// Keys: "n<i>" for node i, "s<j>" for supernode j.
function graphModel(meta, supernodes, pinned, view, maxEdges) {
  const nodes = meta.nodes || [];
  const indexOf = new Map(nodes.map((n, i) => [n.id, i]));
  const keyOf = nodes.map((_, i) => "n" + i);
  const groups = [];
  supernodes.forEach(([label, ...ids], j) => {
    const members = ids.map((id) => indexOf.get(id)).filter((i) => i !== undefined);
    for (const i of members) keyOf[i] = "s" + j;
    groups.push({ key: "s" + j, label, members });
  });
  const sums = new Map();
  for (const [s, t, w] of meta.edges || []) {
    const a = keyOf[s], b = keyOf[t];
    if (a === b) continue;
    const k = a + ">" + b;
    sums.set(k, (sums.get(k) || 0) + w);
  }
  let edges = [...sums].map(([k, w]) => { const [source, target] = k.split(">"); return { source, target, weight: w }; });
  const pinnedKeys = new Set(pinned.map((id) => keyOf[indexOf.get(id)]).filter(Boolean));
  let shown = null; // keys drawn in the pinned view: the pinned ones and their neighbours
  if (view === "pinned" && pinnedKeys.size) {
    edges = edges.filter((e) => pinnedKeys.has(e.source) || pinnedKeys.has(e.target));
    shown = new Set(pinnedKeys);
    for (const e of edges) { shown.add(e.source); shown.add(e.target); }
  }
  const total = edges.length;
  edges.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
  if (edges.length > maxEdges) edges = edges.slice(0, maxEdges);
  return { nodes, keyOf, groups, edges, total, pinnedKeys, shown, indexOf };
}

function render({ model, el }) {
  const root = h("div", { class: "ll-root ll-graph" });
  el.append(root);
  hideStatic(model.get("static_id"));

  const view = h("select", { class: "ll-view" }, [h("option", { value: "all", text: "whole graph" }),
    h("option", { value: "pinned", text: "pinned + neighbours" })]);
  const edgeBox = h("input", { class: "ll-max-edges", type: "number", min: 1, max: 100000, title: "edges drawn (the strongest)" });
  const labelBox = h("input", { class: "ll-group-label", type: "text", placeholder: "supernode label" });
  const status = h("div", { class: "ll-status" });
  const canvas = svg("svg", {}, ["ll-graph-svg"]);
  const scroll = h("div", { class: "ll-scroll" }, [canvas]);
  const legend = h("div", { class: "ll-legendbar ll-legend-text" });
  const tooltip = h("div", { class: "ll-tooltip" });
  root.append(
    h("div", { class: "ll-bar" }, [h("label", {}, ["show ", view]), h("label", {}, ["edges ", edgeBox]),
      h("button", { text: "clear pins", onclick: () => put(model, "pinned", []) })]),
    h("div", { class: "ll-bar" }, [labelBox, h("button", { text: "group", onclick: () => group() }),
      h("button", { text: "ungroup", onclick: () => ungroup() }),
      h("button", { text: "clear selection", onclick: () => put(model, "selected", []) }),
      h("span", { class: "ll-export" }, [h("button", { text: "export JSON", onclick: () => exportJson() })])]),
    status, scroll, legend, tooltip,
  );
  view.addEventListener("change", () => put(model, "view", view.value));
  edgeBox.addEventListener("change", () => put(model, "max_edges", Math.max(1, Math.round(Number(edgeBox.value) || 1))));

  const meta = () => model.get("meta") || {};
  let g = null; // the drawn graph (graphModel)
  let place = new Map(); // key -> {x, y}
  let edgeEls = new Map(); // key -> the edge elements touching it
  let nodeEls = new Map(); // key -> its node element
  let focused = null, redrawing = false; // the node with the keyboard focus, kept across redraws

  // ---------------------------------------------------------------- layout
  function layout() {
    const m = meta(), tokens = m.tokens || [], nL = m.n_layers || 0;
    const cells = new Map(); // "layer,pos" -> keys
    const spot = (key, layer, pos) => {
      const c = layer + "," + pos;
      if (!cells.has(c)) cells.set(c, []);
      cells.get(c).push(key);
    };
    g.nodes.forEach((n, i) => { if (g.keyOf[i] === "n" + i && (!g.shown || g.shown.has("n" + i))) spot("n" + i, n.layer, n.pos); });
    const widths = tokens.map(() => 48);
    for (const [c, keys] of cells) { const p = Number(c.split(",")[1]); widths[p] = Math.max(widths[p], keys.length * GRAPH_NODE_GAP + 10); }
    const left = [];
    let x = GRAPH_LABEL_W;
    for (const w of widths) { left.push(x); x += w; }
    place = new Map();
    const yOf = (layer) => 14 + (nL - layer) * GRAPH_ROW_H;
    for (const [c, keys] of cells) {
      const [layer, p] = c.split(",").map(Number);
      keys.forEach((key, k) => place.set(key, { x: left[p] + (k + 0.5) * widths[p] / keys.length, y: yOf(layer) }));
    }
    for (const grp of g.groups) { // a supernode sits at its members' mean place
      if (!grp.members.length || (g.shown && !g.shown.has(grp.key))) continue;
      const mx = grp.members.reduce((s, i) => s + left[g.nodes[i].pos] + widths[g.nodes[i].pos] / 2, 0) / grp.members.length;
      const my = grp.members.reduce((s, i) => s + yOf(g.nodes[i].layer), 0) / grp.members.length;
      place.set(grp.key, { x: mx, y: my });
    }
    return { width: x + 10, height: yOf(-1) + 40, left, widths, yOf };
  }

  // ---------------------------------------------------------------- drawing
  function draw() {
    const started = performance.now();
    sync();
    const m = meta();
    g = graphModel(m, model.get("supernodes") || [], model.get("pinned") || [], model.get("view"), model.get("max_edges") || 1500);
    const box = layout(), nL = m.n_layers || 0;
    canvas.setAttribute("width", box.width);
    canvas.setAttribute("height", box.height);
    canvas.setAttribute("viewBox", `0 0 ${box.width} ${box.height}`);
    const parts = [];
    for (let layer = -1; layer <= nL; layer++) {
      const label = layer === -1 ? "emb" : layer === nL ? "logit" : "L" + layer;
      const t = svg("text", { x: 4, y: box.yOf(layer) + 4 }, ["ll-axis-text"]);
      t.textContent = label;
      parts.push(t);
    }
    (m.tokens || []).forEach((tok, p) => {
      const t = svg("text", { x: box.left[p] + box.widths[p] / 2, y: box.yOf(-1) + 26, "text-anchor": "middle" }, ["ll-axis-text", "ll-tick-label"]);
      t.textContent = visible(tok);
      parts.push(t);
    });
    const maxW = g.edges.reduce((a, e) => Math.max(a, Math.abs(e.weight)), 1e-12);
    edgeEls = new Map();
    const edgeLayer = svg("g", {}, ["ll-gedges"]);
    for (const e of g.edges) {
      const a = place.get(e.source), b = place.get(e.target);
      if (!a || !b) continue;
      const r = Math.abs(e.weight) / maxW;
      const line = svg("path", { d: `M${a.x.toFixed(1)},${a.y.toFixed(1)} L${b.x.toFixed(1)},${b.y.toFixed(1)}`,
        stroke: e.weight >= 0 ? "#1c7ed6" : "#e03131", "stroke-width": (0.4 + 3.2 * r).toFixed(2),
        "stroke-opacity": (0.12 + 0.6 * r).toFixed(2) }, ["ll-gedge", e.weight >= 0 ? "ll-gedge-pos" : "ll-gedge-neg"]);
      for (const k of [e.source, e.target]) { if (!edgeEls.has(k)) edgeEls.set(k, []); edgeEls.get(k).push(line); }
      edgeLayer.append(line);
    }
    parts.push(edgeLayer);
    const selected = new Set((model.get("selected") || []).map((id) => g.keyOf[g.indexOf.get(id)]));
    const made = new Map();
    const order = g.nodes.map((_, i) => "n" + i).concat(g.groups.map((grp) => grp.key)); // the data's order
    for (const key of order) {
      if (!place.has(key)) continue;
      const node = nodeEl(key, place.get(key), selected.has(key));
      made.set(key, node);
      parts.push(node);
    }
    redrawing = true;
    canvas.replaceChildren(...parts);
    redrawing = false;
    const again = made.get(focused); // keyboard users keep their place across a redraw
    if (again && again.focus) again.focus();
    nodeEls = made;
    legend.textContent = legendText();
    timing("draw", performance.now() - started);
  }

  function legendText() {
    const counts = { feature: 0, error: 0, embedding: 0, logit: 0 };
    for (const n of meta().nodes || []) counts[n.kind]++;
    return `${counts.feature} features, ${counts.error} errors, ${counts.embedding} tokens, ${counts.logit} logits · ` +
      `${g.edges.length} of ${g.total} edges drawn (blue: positive, red: negative; width: |weight|) · ` +
      `${g.pinnedKeys.size} pinned, ${(model.get("supernodes") || []).length} supernodes`;
  }

  function nodeEl(key, at, isSelected) {
    const grp = key[0] === "s" ? g.groups[Number(key.slice(1))] : null;
    const n = grp ? null : g.nodes[Number(key.slice(1))];
    const kind = grp ? "supernode" : n.kind;
    const classes = ["ll-gnode", "ll-gnode-" + kind];
    if (g.pinnedKeys.has(key)) classes.push("ll-gnode-pinned");
    if (isSelected) classes.push("ll-gnode-selected");
    const el = svg("g", { transform: `translate(${at.x.toFixed(1)},${at.y.toFixed(1)})`, tabindex: 0, role: "button",
      "data-key": key, "data-id": grp ? grp.label : n.id, "aria-label": nodeTitle(key) }, classes);
    let shape;
    if (kind === "feature") shape = svg("circle", { r: 5 });
    else if (kind === "supernode") shape = svg("rect", { x: -9, y: -7, width: 18, height: 14, rx: 4 });
    else if (kind === "logit") shape = svg("path", { d: "M0,-7 L7,0 L0,7 L-7,0 Z" });
    else shape = svg("rect", { x: -4.5, y: -4.5, width: 9, height: 9 });
    el.append(shape);
    el.addEventListener("mouseenter", (e) => hover(key, e));
    el.addEventListener("focus", () => { focused = key; hover(key, null); });
    el.addEventListener("mouseleave", unhover);
    el.addEventListener("blur", () => { if (!redrawing) focused = null; unhover(); });
    el.addEventListener("click", (e) => (e.shiftKey ? toggleSelect(key) : togglePin(key)));
    el.addEventListener("keydown", (e) => {
      if (e.key === "Enter") { e.preventDefault(); togglePin(key); }
      else if (e.key === " ") { e.preventDefault(); toggleSelect(key); }
    });
    return el;
  }

  // ---------------------------------------------------------------- read-outs
  const idsOf = (key) => key[0] === "s" ? g.groups[Number(key.slice(1))].members.map((i) => g.nodes[i].id) : [g.nodes[Number(key.slice(1))].id];

  function nodeTitle(key) {
    if (key[0] === "s") { const grp = g.groups[Number(key.slice(1))]; return `supernode ${grp.label} (${grp.members.length} nodes)`; }
    const n = g.nodes[Number(key.slice(1))], tok = (meta().tokens || [])[n.pos];
    if (n.kind === "feature") return `feature ${n.feature} at layer ${n.layer}, position ${n.pos} ${visible(tok)}`;
    if (n.kind === "error") return `error at layer ${n.layer}, position ${n.pos} ${visible(tok)}`;
    if (n.kind === "embedding") return `token ${visible(n.text)} at position ${n.pos}`;
    return `logit ${visible(n.text)} (p=${fmt(n.prob, 3)})`;
  }

  function contextHtml(ctx) {
    const max = Math.max(ctx.max, 1e-9);
    const spans = ctx.tokens.map((t, i) => {
      const a = Math.max(0, Math.min(1, (ctx.acts[i] || 0) / max));
      const tag = i === ctx.at ? "b" : "span";
      return `<${tag} style="background:rgba(232,89,12,${a.toFixed(2)})">${escapeHtml(visible(t))}</${tag}>`;
    });
    return `<div class="ll-gctx">${fmt(ctx.max, 2)}: ${spans.join("")}</div>`;
  }

  function tipHtml(key) {
    let out = `<b>${escapeHtml(nodeTitle(key))}</b>`;
    if (key[0] === "s") {
      const grp = g.groups[Number(key.slice(1))];
      return out + "<br>" + grp.members.map((i) => escapeHtml(nodeTitle("n" + i))).join("<br>");
    }
    const n = g.nodes[Number(key.slice(1))];
    if (n.act !== null && n.act !== undefined) out += `<br>activation ${fmt(n.act, 3)}`;
    if (n.infl !== null && n.infl !== undefined) out += ` · influence ${fmt(n.infl, 3)}`;
    if (n.readout) out += `<br>read-out: <span class="ll-tok">${n.readout.map((t) => escapeHtml(visible(t))).join(" ")}</span>`;
    if (n.ctx && n.ctx.length) out += "<br>top contexts:" + n.ctx.map(contextHtml).join("");
    else if (n.ctx) out += "<br>no context activates it";
    return out;
  }

  function hover(key, e) {
    const started = performance.now();
    tooltip.innerHTML = tipHtml(key);
    tooltip.style.display = "block";
    for (const line of edgeEls.get(key) || []) line.classList.add("ll-gedge-hot");
    const at = place.get(key) || { x: 0, y: 0 };
    const r = root.getBoundingClientRect(), c = canvas.getBoundingClientRect();
    const x = e ? e.clientX - r.left : c.left - r.left + at.x - scroll.scrollLeft;
    const y = e ? e.clientY - r.top : c.top - r.top + at.y;
    tooltip.style.left = Math.max(0, Math.min(x + 14, root.clientWidth - tooltip.offsetWidth)) + "px";
    tooltip.style.top = Math.max(0, y + 14) + "px";
    hovered = key;
    timing("hover", performance.now() - started);
  }
  let hovered = null;

  function unhover() {
    tooltip.style.display = "none";
    for (const line of edgeEls.get(hovered) || []) line.classList.remove("ll-gedge-hot");
    hovered = null;
  }

  // ---------------------------------------------------------------- pins, selection, supernodes
  function toggle(name, key) {
    const started = performance.now();
    const ids = idsOf(key), now = model.get(name) || [];
    const on = ids.every((id) => now.includes(id));
    put(model, name, on ? now.filter((id) => !ids.includes(id)) : now.concat(ids.filter((id) => !now.includes(id))));
    timing("click", performance.now() - started);
  }
  const togglePin = (key) => toggle("pinned", key);
  const toggleSelect = (key) => toggle("selected", key);

  function group() {
    const chosen = model.get("selected") || [];
    if (!chosen.length) { status.textContent = "select nodes first (shift-click or Space)"; return; }
    const kept = (model.get("supernodes") || []).map(([label, ...ids]) => [label, ...ids.filter((id) => !chosen.includes(id))])
      .filter((s) => s.length > 1);
    const label = labelBox.value.trim() || `supernode ${kept.length + 1}`;
    put(model, "supernodes", kept.concat([[label, ...chosen]]));
    put(model, "selected", []);
    labelBox.value = "";
  }

  function ungroup() {
    const chosen = new Set(model.get("selected") || []);
    put(model, "supernodes", (model.get("supernodes") || []).filter(([, ...ids]) => !ids.some((id) => chosen.has(id))));
    put(model, "selected", []);
  }

  // circuit-tracer's graph JSON of the pruned graph, its qParams holding the pins and supernodes: what Python's
  // GraphExplorer.export writes (graph_data.circuit_json), with the edge weights to 6 significant digits.
  function exportJson() {
    const m = meta(), nL = m.n_layers;
    const nodes = (m.nodes || []).map((n) => {
      const layer = n.kind === "embedding" ? "E" : n.kind === "logit" ? String(nL + 1) : String(n.layer);
      const feature = n.kind === "feature" ? (n.layer + n.feature) * (n.layer + n.feature + 1) / 2 + n.feature
        : n.kind === "error" ? -1 : n.kind === "embedding" ? n.pos : n.feature;
      const js = n.kind === "feature" ? `${n.layer}_${n.feature}-0` : n.kind === "error" ? `${n.layer}_${n.pos}-0`
        : n.kind === "embedding" ? `E_${n.feature}-${n.pos}` : `L_${n.feature}-${n.pos}`;
      return { node_id: n.id, feature, layer, ctx_idx: n.pos, feature_type: GRAPH_CT_TYPES[n.kind],
        token_prob: n.kind === "logit" ? n.prob : 0.0, is_target_logit: n.rank === 0,
        run_idx: 0, reverse_ctx_idx: 0, jsNodeId: js, clerp: n.clerp || "", influence: n.infl ?? null,
        activation: n.act ?? null };
    });
    const links = (m.edges || []).map(([s, t, w]) => ({ source: m.nodes[s].id, target: m.nodes[t].id, weight: w }));
    const data = { metadata: m.metadata, qParams: { pinnedIds: model.get("pinned") || [],
      supernodes: model.get("supernodes") || [], linkType: "both", clickedId: "", sg_pos: "" }, nodes, links };
    download("graph.json", JSON.stringify(data, null, 2), "application/json");
  }

  function sync() {
    view.value = model.get("view");
    edgeBox.value = model.get("max_edges");
    const error = model.get("error");
    status.textContent = error ? "error: " + error : model.get("status");
    status.classList.toggle("ll-error", !!error);
  }

  // Pins and selection restyle the drawn nodes where the drawing stays (the whole graph); the pinned view redraws.
  function restyle() {
    if (model.get("view") === "pinned") { draw(); return; }
    const started = performance.now();
    const pinned = new Set((model.get("pinned") || []).map((id) => g.keyOf[g.indexOf.get(id)]));
    const selected = new Set((model.get("selected") || []).map((id) => g.keyOf[g.indexOf.get(id)]));
    g.pinnedKeys = pinned;
    for (const [key, node] of nodeEls) {
      node.classList.toggle("ll-gnode-pinned", pinned.has(key));
      node.classList.toggle("ll-gnode-selected", selected.has(key));
    }
    legend.textContent = legendText();
    timing("restyle", performance.now() - started);
  }
  for (const name of ["meta", "supernodes", "view", "max_edges"]) model.on("change:" + name, draw);
  for (const name of ["pinned", "selected"]) model.on("change:" + name, restyle);
  for (const name of ["status", "error"]) model.on("change:" + name, sync);
  const stopWatchingTheme = watchTheme(draw);
  draw();
  const since = model.get("data_time");
  if (since) timing("render", Date.now() - since * 1000);
  root.dataset.ready = "1";
  return stopWatchingTheme;
}

export default { render };
