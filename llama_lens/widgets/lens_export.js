// The logit-lens explorer's exports as text: the first panel's heatmap as SVG, every panel's cells as CSV rows.

// The heatmap as drawn: `rows` (read-outs, top first), cells of `cellW` px coloured by `colour(r, c)` (a palette
// entry, or null where the metric has no value), the top token's text in the cells wide enough for it.
function lensSvg(d, rows, colour, cellW) {
  const P = d.positions.length;
  const parts = [];
  rows.forEach((r, y) => {
    parts.push(`<text x="${LABEL_W - 4}" y="${(y + 0.7) * ROW_H}" text-anchor="end" font-size="11">${escapeHtml(d.labels[r])}</text>`);
    for (let c = 0; c < P; c++) {
      const fill = colour(r, c) || { css: "#eee", ink: "#000" };
      const x = LABEL_W + c * cellW;
      parts.push(`<rect x="${x}" y="${y * ROW_H}" width="${cellW - 1}" height="${ROW_H - 1}" fill="${fill.css}"/>`);
      if (cellW >= 20) {
        const text = visible(d.vocab[d.top[(r * P + c) * d.k]]).slice(0, Math.floor(cellW / 7));
        parts.push(`<text x="${x + cellW / 2}" y="${(y + 0.7) * ROW_H}" text-anchor="middle" font-size="10" fill="${fill.ink}">${escapeHtml(text)}</text>`);
      }
    }
  });
  d.positions.forEach((pos, c) => parts.push(`<text x="${LABEL_W + (c + 0.5) * cellW}" y="${(rows.length + 0.7) * ROW_H}" text-anchor="middle" font-size="10">${escapeHtml(visible(d.tokens[pos]).slice(0, 8))}</text>`));
  const W = LABEL_W + P * cellW, H = (rows.length + 1) * ROW_H;
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif">${parts.join("")}</svg>`;
}

// The CSV's lines: a header, then a row per panel, read-out and position (the metrics empty where not held).
function lensCsvLines(panels, target) {
  const lines = [["panel", "readout", "position", "token", "top_token", "top_prob", "entropy", "kl_to_final", "target_prob", "target_rank"].join(",")];
  const metric = (d, name, i) => (d.metrics[name] ? d.metrics[name][i] : "");
  panels.forEach((d, p) => {
    const P = d.positions.length;
    const t = target.panels ? target.panels[p] : null;
    for (let r = 0; r < d.labels.length; r++) for (let c = 0; c < P; c++) {
      const i = r * P + c;
      lines.push([p, d.labels[r], d.positions[c], d.tokens[d.positions[c]], d.vocab[d.top[i * d.k]], d.probs[i * d.k] / d.prob_scale,
        metric(d, "entropy", i), metric(d, "kl", i), t && t.probs ? t.probs[i] : "", t && t.ranks ? t.ranks[i] : ""].map(csvCell).join(","));
    }
  });
  return lines;
}
