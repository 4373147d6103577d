// The logit-lens explorer's pins: the clicked cell's top-k list, whose tokens are pinned (shift: summed with the
// last pin) or chosen to colour the cells, and the chart of the pinned tokens' summed probability (or best rank)
// across the read-outs, exact from the kernel (the `traces` trait) once they have come, else from the top-k.

function lensPins({ model, panels, topList, popup, chart, tokenBox, redraw }) {
  const send = (name, value) => put(model, name, value);

  function addPin(p, pos, id, extend) {
    const pins = (model.get("pins") || []).map((g) => ({ ...g, ids: [...g.ids] }));
    const last = pins[pins.length - 1];
    if (extend && last && last.panel === p && last.position === pos) {
      if (!last.ids.includes(id)) last.ids.push(id);
    } else {
      pins.push({ panel: p, position: pos, ids: [id] });
    }
    model.set("pins", pins.slice(-24));
  }

  function drawPopup() {
    const s = model.get("selection") || {};
    const d = panels()[s.panel];
    if (!d || s.row === undefined) return;
    const c = d.positions.indexOf(s.position);
    if (c < 0 || s.row >= d.labels.length) return;
    const list = h("ol", { class: "ll-topk" });
    const top = topList(s.panel, s.row, c, d.k);
    if (!top) list.append(h("li", { class: "ll-loading", text: "loading…" }));
    for (const t of top || []) {
      const item = h("li", {}, [
        h("button", { class: "ll-pin", "data-id": t.id, title: "pin (shift: add to the last pin)",
          text: visible(t.text), onclick: (e) => {
            const started = performance.now();
            addPin(s.panel, s.position, t.id, e.shiftKey);
            model.save_changes();
            drawChart();
            timing("pin", performance.now() - started);
          } }),
        h("span", { class: "ll-bar-prob", style: `width:${Math.round(t.prob * 80)}px` }),
        h("span", { text: " " + fmt(t.prob, 3) + " " }),
        h("a", { href: "#", text: "colour", title: "colour the cells by this token", onclick: (e) => {
          e.preventDefault();
          tokenBox.value = "#" + t.id;
          send("token", "#" + t.id);
          send("metric", "token_prob");
        } }),
      ]);
      list.append(item);
    }
    popup.replaceChildren(
      h("div", { class: "ll-popup-title", text: `${d.labels[s.row]} · position ${s.position} ${visible(d.tokens[s.position])}` }),
      list);
  }

  // A pin's line: exact values from the kernel (traces) when they have arrived, else from the top-k lists
  // (gaps where the token is not among a read-out's top k; dashed).
  function pinLine(g) {
    const traces = model.get("traces") || [];
    const exact = traces.find((t) => t.panel === g.panel && t.position === g.position &&
      t.ids.length === g.ids.length && t.ids.every((id, j) => id === g.ids[j]));
    const d = panels()[g.panel];
    if (exact) return { probs: exact.probs, ranks: exact.ranks, texts: exact.texts, exact: true };
    if (!d) return null;
    const c = d.positions.indexOf(g.position);
    const probs = [], ranks = [], texts = [];
    for (let r = 0; r < d.labels.length; r++) {
      const list = topList(g.panel, r, c, d.k) || []; // gaps until the position's top-k comes
      let sum = 0, best = null;
      for (const id of g.ids) {
        const j = list.findIndex((t) => t.id === id);
        if (j >= 0) { sum += list[j].prob; best = best === null ? j : Math.min(best, j); }
      }
      probs.push(best === null ? null : sum);
      ranks.push(best);
    }
    for (const id of g.ids) {
      const v = d.index.get(id);
      texts.push(v !== undefined ? d.vocab[v] : "#" + id);
    }
    return { probs, ranks, texts, exact: false };
  }

  function drawChart() {
    const pins = model.get("pins") || [];
    if (!pins.length) {
      chart.replaceChildren(h("em", { text: "click a token in the list to pin its trajectory (shift-click sums)" }));
      return;
    }
    const d = panels()[0];
    const R = Math.max(...panels().map((x) => x.labels.length));
    const W = 520, H = 220, L = 44, B = 40, T = 10;
    const byRank = model.get("trajectory") === "rank";
    let maxRank = 1;
    const lines = pins.map(pinLine);
    for (const line of lines) for (const v of (line && line.ranks) || []) if (v !== null && v > maxRank) maxRank = v;
    const x = (r) => L + (r / Math.max(1, R - 1)) * (W - L - 10);
    const y = (v) => byRank ? T + (Math.log1p(v) / Math.log1p(maxRank)) * (H - T - B) : T + (1 - v) * (H - T - B);
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("width", W);
    svg.setAttribute("height", H);
    svg.setAttribute("class", "ll-chart-svg");
    const add = (tag, attrs, text) => {
      const node = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
      if (text !== undefined) node.textContent = text;
      svg.append(node);
      return node;
    };
    add("line", { x1: L, y1: H - B, x2: W - 10, y2: H - B, class: "ll-axis" });
    add("line", { x1: L, y1: T, x2: L, y2: H - B, class: "ll-axis" });
    add("text", { x: L - 4, y: T + 8, "text-anchor": "end", class: "ll-axis-text" }, byRank ? "0" : "1");
    add("text", { x: L - 4, y: H - B, "text-anchor": "end", class: "ll-axis-text" }, byRank ? String(maxRank) : "0");
    add("text", { x: (W + L) / 2, y: H - 6, "text-anchor": "middle", class: "ll-axis-text" },
      `read-out (${d.labels[0]} … ${d.labels[d.labels.length - 1]}); y: ${byRank ? "best rank (log)" : "summed probability"}`);
    // Per-layer ticks on the read-out axis: a mark at every read-out, the layer's number under every step-th
    // (about ten numbers whatever the depth, the last read-out's always), "emb" for the embedding.
    const step = Math.max(1, Math.ceil(R / 10));
    for (let r = 0; r < R; r++) {
      const labelled = r % step === 0 || r === R - 1;
      if (r === R - 1 && r % step !== 0 && r % step < step / 2) continue; // too close to the last number
      add("line", { x1: x(r), y1: H - B, x2: x(r), y2: H - B + (labelled ? 5 : 3), class: "ll-axis ll-tick" });
      if (!labelled || r >= d.labels.length) continue;
      const text = d.labels[r] === "embed" ? "emb" : String(d.layers[r]);
      add("text", { x: x(r), y: H - B + 15, "text-anchor": "middle", class: "ll-axis-text ll-tick-label" }, text);
    }
    const colours = ["#e8590c", "#1c7ed6", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599", "#e03131", "#5c940d"];
    lines.forEach((line, i) => {
      if (!line) return;
      const values = byRank ? line.ranks : line.probs;
      let path = "", pen = false;
      values.forEach((v, r) => {
        if (v === null || v === undefined) { pen = false; return; }
        path += `${pen ? "L" : "M"}${x(r).toFixed(1)},${y(v).toFixed(1)}`;
        pen = true;
      });
      const label = line.texts.map(visible).join(" + ") + ` @${pins[i].position}` + (panels().length > 1 ? ` (panel ${pins[i].panel + 1})` : "");
      add("path", { d: path, fill: "none", stroke: colours[i % colours.length], "stroke-width": 2,
        "stroke-dasharray": line.exact ? "" : "4 3", class: "ll-pin-line", "data-label": label });
      add("text", { x: W - 12, y: T + 12 + i * 13, "text-anchor": "end", fill: colours[i % colours.length],
        class: "ll-pin-label" }, label);
    });
    chart.replaceChildren(svg, h("button", { text: "clear pins", onclick: () => {
      model.set("pins", []); model.set("pinned_positions", []); model.save_changes(); redraw();
    } }));
  }

  return { addPin, drawPopup, drawChart };
}
