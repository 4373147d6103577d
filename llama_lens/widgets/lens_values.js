// The logit-lens explorer's values and colours: each cell's value for the chosen metric (from the panels' top-k,
// the metrics that came, or the target's or colour token's data), the scale shared by the panels, and the
// colour a cell gets (a colour map, or the diverging map for the difference of two panels).

const SEQUENTIALS = {}; // colour map name -> its 256-entry palette, made when first shown
const sequential = (name) => SEQUENTIALS[name] || (SEQUENTIALS[name] = palette(COLORMAPS[name] || VIRIDIS));
const DIVERGENT = palette(DIVERGING);

function lensValues(model, panels, offline) {
  // The current metric's raw value at (panel, row, column), or null where it is not available.
  function value(p, r, c, which = model.get("metric")) {
    const d = panels()[p];
    const i = r * d.P + c;
    if (which === "prob") return d.probs[i * d.k] / d.prob_scale;
    if (which === "logit" || which === "entropy" || which === "kl") {
      return d.metrics[which] ? d.metrics[which][i] : null; // until it comes (pages saved before "logit": never)
    }
    const source = which.startsWith("target") ? model.get("target_data") : model.get("token_data");
    if (!source || !source.panels || !source.panels[p]) return null;
    // Ranks are computed when a rank colouring first asks for them: null until they arrive.
    const values = which.endsWith("rank") ? source.panels[p].ranks : source.panels[p].probs;
    return values ? values[i] : null;
  }

  // Why the metric has no values to show, or "" when it has them.
  function missingData(which) {
    if (which === "logit" || which === "entropy" || which === "kl") {
      if (panels().every((d) => d.metrics[which])) return "";
      return offline ? "not saved with this page" : "loading…";
    }
    if (!which.startsWith("target") && !which.startsWith("token")) return "";
    const source = which.startsWith("target") ? model.get("target_data") : model.get("token_data");
    if (!source || !source.panels) return which.startsWith("target") ? "set a target" : "choose a colour token";
    if (which.endsWith("rank") && source.panels.some((s) => !s.ranks)) {
      return offline ? "ranks were not saved with this page" : "ranking…";
    }
    return "";
  }

  // Scale shared by the panels: value -> t in [0, 1] (or [-1, 1] for a difference).
  function scale() {
    const which = model.get("metric");
    const ps = panels();
    if (which === "entropy" || which === "kl") {
      let max = 1e-9;
      for (const d of ps) for (const v of d.metrics[which] || []) if (v > max) max = v;
      return { max, f: (v) => v / max, label: [0, max] };
    }
    if (which === "logit") {
      // Raw logits are not normalised: the scale runs from the least to the greatest shown.
      let min = Infinity, max = -Infinity;
      for (const d of ps) for (const v of d.metrics.logit || []) { if (v < min) min = v; if (v > max) max = v; }
      if (!(max > min)) { min = Number.isFinite(min) ? min : 0; max = min + 1; }
      return { max, f: (v) => (v - min) / (max - min), label: [min, max] };
    }
    if (which.endsWith("rank")) {
      const source = which.startsWith("target") ? model.get("target_data") : model.get("token_data");
      let max = 1;
      for (const s of (source && source.panels) || []) for (const v of s.ranks || []) if (v > max) max = v;
      const lmax = Math.log1p(max);
      return { max, f: (v) => 1 - Math.log1p(v) / lmax, label: [max, 0], rank: true };
    }
    return { max: 1, f: (v) => v, label: [0, 1] };
  }

  // Columns of panel p paired with panel 1 - p for the difference: positions aligned at the end.
  function partner(p, c) {
    const ps = panels();
    if (ps.length < 2) return null;
    const q = 1 - p;
    const c2 = c - (ps[p].positions.length - ps[q].positions.length);
    return c2 >= 0 && c2 < ps[q].positions.length ? [q, c2] : null;
  }

  // The cell's colour as a palette entry {css, ink, rgb}, or null where the metric has no value.
  function colourOf(p, r, c, sc) {
    const v = value(p, r, c);
    if (v === null || v === undefined) return null;
    const ps = panels();
    if (model.get("diff") && ps.length === 2) {
      const other = partner(p, c);
      if (!other || r >= ps[other[0]].labels.length) return null;
      const w = value(other[0], r, other[1]);
      if (w === null || w === undefined) return null;
      const a = p === 0 ? sc.f(v) : sc.f(w);
      const b = p === 0 ? sc.f(w) : sc.f(v);
      return shade(DIVERGENT, 0.5 + (a - b) / 2);
    }
    return shade(sequential(model.get("colormap")), sc.f(v));
  }

  return { value, missingData, scale, partner, colourOf };
}
