// The logit-lens explorer's data as the page holds it, one object per panel:
//   R, P, k, tokens, positions, labels, layers, prob_scale, run
//   vocab, vocab_ids, index (id -> vocab index): the texts of the tokens named so far
//   top, probs: [R * P * k] vocab indices and probabilities (in 1/prob_scale) of every cell's top-k; every
//     cell's top-1 is always there, the rest only for the positions where have[c] is 1
//   metrics: {logit, entropy, kl} as [R * P] Float32Arrays, those that have come
// A live page starts from the kernel's frame (lens_data.frame: every top-1, the first positions' top-k, the
// shown metric) and asks for the rest through the widget's message channel (lens_data.answer); a saved page's
// panels (lens_data.payload) are whole, and it never asks.

const BLOCK = 32; // positions per request

function lensPanels(model, offline, onArrival) {
  const held = new WeakMap(); // the trait's panel object -> the page's panel

  function hold(raw) {
    let d = held.get(raw);
    if (d) return d;
    const R = raw.labels.length, P = raw.positions.length, k = raw.k;
    d = { ...raw, R, P, vocab: [], vocab_ids: [], index: new Map(), top: new Uint32Array(R * P * k),
      probs: new Uint16Array(R * P * k), have: new Uint8Array(P), metrics: {}, asked: new Set() };
    // A whole panel is one part of every position, with its metrics beside it.
    const parts = raw.parts || [{ start: 0, stop: P, k, vocab: raw.vocab, vocab_ids: raw.vocab_ids,
      packed: raw.packed, top: raw.top, probs: raw.probs }];
    for (const part of parts) merge(d, part);
    for (const name of ["logit", "entropy", "kl"]) {
      const packed = raw.metrics ? raw.metrics[name] && raw.metrics[name].values : raw[name];
      if (typeof packed === "string") d.metrics[name] = fromBase64(packed, "f4"); // pages saved before "logit": none
    }
    held.set(raw, d);
    return d;
  }

  // A part: the top-k of positions [start, stop) at every read-out, indices into its own vocabulary.
  function merge(d, part) {
    const map = part.vocab_ids.map((id, j) => {
      let v = d.index.get(id);
      if (v === undefined) {
        v = d.vocab.length;
        d.index.set(id, v);
        d.vocab.push(part.vocab[j]);
        d.vocab_ids.push(id);
      }
      return v;
    });
    const top = fromBase64(part.top, part.packed.top), probs = fromBase64(part.probs, part.packed.probs);
    const width = part.stop - part.start;
    for (let r = 0; r < d.R; r++) {
      for (let c = part.start; c < part.stop; c++) {
        for (let j = 0; j < part.k; j++) {
          const from = (r * width + c - part.start) * part.k + j, to = (r * d.P + c) * d.k + j;
          d.top[to] = map[top[from]];
          d.probs[to] = probs[from];
        }
      }
    }
    if (part.k === d.k) d.have.fill(1, part.start, part.stop);
  }

  const panels = () => (model.get("panels") || []).map(hold);

  // Sends a request once (until a new frame); a saved page has no kernel to ask.
  function ask(p, request) {
    const d = panels()[p];
    if (offline || !d || d.run === undefined) return;
    const key = JSON.stringify(request);
    if (d.asked.has(key)) return;
    d.asked.add(key);
    model.send({ ...request, run: d.run, panel: p });
  }

  // Asks for the top-k of the blocks of positions that overlap [from, to) and have not come.
  function askColumns(p, from, to) {
    const d = panels()[p];
    if (!d) return;
    for (let start = Math.floor(Math.max(0, from) / BLOCK) * BLOCK; start < Math.min(to, d.P); start += BLOCK) {
      const stop = Math.min(d.P, start + BLOCK);
      if (d.have.subarray(start, stop).includes(0)) ask(p, { want: "columns", start, stop });
    }
  }

  // A reply from the kernel: merged into its panel, unless it is about an older run.
  const receive = (reply) => {
    const d = panels()[reply.panel];
    if (!d || reply.run !== d.run || reply.stale) return;
    if (reply.error) {
      onArrival(reply, reply.error);
      return;
    }
    if (reply.want === "metric") d.metrics[reply.metric] = fromBase64(reply.values, "f4");
    else merge(d, reply);
    onArrival(reply, "");
  };
  model.on("msg:custom", receive);

  return { panels, ask, askColumns, stop: () => model.off("msg:custom", receive) };
}
