// Runs an explorer's view (common.js + lens.js or attention.js) in Node on a stand-in DOM, drives its controls and
// prints what it shows as JSON: the widget state a test asserts on (texts, values, downloads), never pixels.
//
//   node view_harness.mjs <widgets folder> <lens|attention|features> <state.json> <script.json>
//
// state.json: the synced traits (an explorer's page_state()); script.json: a list of steps, each
// {"set": name, "value": v} (a change from the kernel), {"click": selector} (a button by its text, "text:CSV"),
// {"key": "ArrowUp", "panel": 0} (a key on a heatmap), {"hover": [x, y]}, {"click_at": [x, y]} (on the heatmap),
// {"click_item": [class, n]} (the n-th element of that class), {"root_height": px} (the explorer's height) or
// {"dispatch": [class, n, type, event]} (an event on the n-th element of that class: "mouseenter", "keydown"
// with {"key": "Enter"}, "click" with {"shiftKey": true}), {"input": [class, text]} (types into a box) or
// {"report": label} (`fills`: the canvas colours drawn since the last report; `state`: the synced values named
// by the step's "keys"; `attrs`: the step's "attrs" [class, attribute] read off every such element),
// {"deliver": message} (a message from the kernel, as lens_data.answer writes it), {"scroll": [x, y]} (the
// first scrolling box's offsets, then its scroll event), {"box": [class, width, height]} (an element's size, then
// the ResizeObservers' calls), {"mouseover": pos} (the pointer onto the prompt's token at pos) or
// {"report": label} as above. A view whose render returns a
// promise (it inflates its data) is awaited first. Errors thrown
// anywhere (render, listeners, clicks) are caught and reported; the test asserts there are none.
import fs from "node:fs";
import vm from "node:vm";

const [folder, which, statePath, scriptPath] = process.argv.slice(2);
const state = JSON.parse(fs.readFileSync(statePath, "utf8"));
const script = JSON.parse(fs.readFileSync(scriptPath, "utf8"));

class ClassList {
  constructor(node) { this.node = node; }
  get set() { return new Set(this.node.className.split(/\s+/).filter(Boolean)); }
  contains(c) { return this.set.has(c); }
  add(c) { const s = this.set; s.add(c); this.node.className = [...s].join(" "); }
  remove(c) { const s = this.set; s.delete(c); this.node.className = [...s].join(" "); }
  toggle(c, on) { if (on === undefined) on = !this.contains(c); on ? this.add(c) : this.remove(c); return on; }
}

const fills = new Set(); // every fillStyle drawn with since the last report: the colours a colour map gave
const context2d = new Proxy({}, {
  get: (target, name) => (name in target ? target[name] : name === "measureText" ? (t) => ({ width: 6 * String(t).length }) : () => {}),
  set: (target, name, value) => { if (name === "fillStyle") fills.add(String(value)); target[name] = value; return true; },
});

class Node {
  constructor(tag) {
    this.tagName = tag.toUpperCase(); this.children = []; this.parent = null; this.style = {}; this.dataset = {};
    this.attributes = {}; this.listeners = {}; this.className = ""; this.classList = new ClassList(this);
    this._text = ""; this.innerHTML = ""; this.value = ""; this.checked = false; this.disabled = false;
    this.scrollLeft = 0; this.scrollTop = 0; this.clientWidth = 800; this.clientHeight = 2000; this.offsetWidth = 200; this.offsetHeight = 120;
  }
  set textContent(t) { this._text = String(t); this.children = []; }
  get textContent() { return this._text + this.children.map((c) => (typeof c === "string" ? c : c.textContent)).join(""); }
  append(...nodes) { for (const n of nodes) { if (n instanceof Node) { n.remove(); n.parent = this; } this.children.push(n); } }
  replaceChildren(...nodes) { for (const c of this.children) if (c instanceof Node) c.parent = null; this.children = []; this._text = ""; this.append(...nodes); }
  remove() { if (this.parent) this.parent.children = this.parent.children.filter((c) => c !== this); this.parent = null; }
  setAttribute(k, v) {
    this.attributes[k] = String(v);
    if (k.startsWith("data-")) this.dataset[k.slice(5).replace(/-(.)/g, (_, c) => c.toUpperCase())] = String(v);
  }
  getAttribute(k) { return this.attributes[k] ?? null; }
  addEventListener(type, fn) { (this.listeners[type] = this.listeners[type] || []).push(fn); }
  removeEventListener() {}
  dispatch(type, event = {}) {
    for (const fn of this.listeners[type] || []) fn({ target: this, preventDefault() {}, shiftKey: false, ...event });
  }
  click() { this.dispatch("click"); if (this.tagName === "A" && this.attributes.download) downloads.push(this.attributes.download); }
  getBoundingClientRect() { return { left: 0, top: 0, width: 800, height: 2000 }; }
  getContext() { return context2d; }
  toBlob(cb) { cb(new Blob(["png"])); }
  *walk() { yield this; for (const c of this.children) if (c instanceof Node) yield* c.walk(); }
  all(predicate) { return [...this.walk()].filter(predicate); }
}

const downloads = [];
const made = {}; // elements created, by tag: what a redraw rebuilt
const blobs = [];
const documentStub = {
  createElement: (tag) => { made[tag] = (made[tag] || 0) + 1; return new Node(tag); },
  createElementNS: (ns, tag) => new Node(tag),
  getElementById: () => null,
  body: new Node("body"),
  head: new Node("head"),
};
const errors = [];
const sandbox = {
  document: documentStub, console, performance, Blob, atob, Uint8Array, Uint16Array, Uint32Array, Float32Array, Set, Map,
  JSON, Math, Response, DecompressionStream, TextDecoder,
  getComputedStyle: () => ({ color: "rgb(0, 0, 0)", backgroundColor: "rgb(255, 255, 255)", fontFamily: "sans-serif",
    getPropertyValue: () => "" }),
  MutationObserver: class { observe() {} disconnect() {} },
  ImageData: class { constructor(w, h) { this.width = w; this.height = h; this.data = new Uint8ClampedArray(w * h * 4); } },
  URL: { createObjectURL: (blob) => { blobs.push(blob); return "blob:" + blobs.length; }, revokeObjectURL() {} },
  setTimeout: () => 0,
  addEventListener() {}, removeEventListener() {},
  ResizeObserver: class { constructor(cb) { this.cb = cb; observers.push(this); } observe() {} disconnect() {} },
};
const observers = [];
sandbox.window = sandbox;
vm.createContext(sandbox);
// The files in the order the explorer's _esm concatenates them.
const files = { lens: ["common.js", "lens_parts.js", "lens_values.js", "lens_pins.js", "lens_export.js", "lens.js"] }[which] || ["common.js", `${which}.js`];
const source = files.map((name) => fs.readFileSync(`${folder}/${name}`, "utf8")).join("");
vm.runInContext(source.replace("export default", "globalThis.explorerModule ="), sandbox);

// The stand-in widget model of save_html's page (base.py PAGE), recording what the view sends.
const listeners = {};
const sent = [];
const messages = []; // what the view asked the kernel (model.send)
const model = {
  get: (name) => state[name],
  set: (name, value) => { const old = state[name]; state[name] = value;
    for (const cb of listeners["change:" + name] || []) guard(() => cb({ name, old, new: value })); },
  save_changes: () => sent.push("save"),
  on: (event, cb) => { (listeners[event] = listeners[event] || []).push(cb); },
  off: () => {},
  send: (content) => messages.push(content),
};
function guard(fn) {
  try { fn(); } catch (error) { errors.push(String(error && error.stack ? error.stack.split("\n").slice(0, 2).join(" ") : error)); }
}

const el = new Node("div");
let rendered;
guard(() => { rendered = sandbox.explorerModule.render({ model, el }); });
if (rendered && typeof rendered.then === "function") {
  try { await rendered; } catch (error) { errors.push(String(error && error.stack ? error.stack.split("\n").slice(0, 2).join(" ") : error)); }
}
const find = (cls) => el.all((n) => n.classList.contains(cls));
const reports = {};
for (const step of script) {
  if (step.set !== undefined) model.set(step.set, step.value);
  else if (step.dispatch !== undefined) {
    const [cls, n, type, event] = step.dispatch;
    const node = find(cls)[n];
    if (!node) errors.push(`no element ${cls} ${n}`); else guard(() => node.dispatch(type, event || {}));
  } else if (step.input !== undefined) find(step.input[0])[0].value = step.input[1];
  else if (step.root_height !== undefined) el.children[0].clientHeight = step.root_height;
  else if (step.deliver !== undefined) {
    for (const cb of listeners["msg:custom"] || []) guard(() => cb(step.deliver, []));
  } else if (step.box !== undefined) {
    const node = find(step.box[0])[0];
    [node.clientWidth, node.clientHeight] = step.box.slice(1);
    for (const observer of observers) guard(() => observer.cb([]));
  } else if (step.mouseover !== undefined) {
    const span = find("ll-text")[0].all((m) => m.dataset.pos === String(step.mouseover))[0];
    if (!span) errors.push(`no token ${step.mouseover} in the page`);
    else guard(() => find("ll-text")[0].dispatch("mouseover", { target: span }));
  } else if (step.scroll !== undefined) {
    const box = find(which === "lens" ? "ll-scroll" : "ll-text")[0];
    box.scrollLeft = step.scroll[0];
    box.scrollTop = step.scroll[1];
    guard(() => box.dispatch("scroll"));
  }
  else if (step.click !== undefined) {
    const [kind, text] = step.click.split(":");
    const node = el.all((n) => n.tagName === "BUTTON" && n.textContent === text)[0];
    if (!node) errors.push(`no button ${text}`); else guard(() => node.dispatch("click"));
  } else if (step.key !== undefined) {
    const canvas = find("ll-cells")[step.panel || 0];
    guard(() => canvas.dispatch("keydown", { key: step.key }));
  } else if (step.click_at !== undefined) {
    const canvas = find("ll-cells")[0];
    guard(() => canvas.dispatch("click", { clientX: step.click_at[0], clientY: step.click_at[1] }));
  } else if (step.click_item !== undefined) {
    const node = find(step.click_item[0])[step.click_item[1]];
    if (!node) errors.push(`no element ${step.click_item}`); else guard(() => node.dispatch("click"));
  } else if (step.hover !== undefined) {
    const canvas = find("ll-cells")[0] || find("ll-att-canvas")[0];
    guard(() => canvas.dispatch("mousemove", { clientX: step.hover[0], clientY: step.hover[1] }));
  } else if (step.report !== undefined) {
    reports[step.report] = {
      legend: (find("ll-legend-text")[0] || { textContent: "" }).textContent,
      tooltip: (find("ll-tooltip")[0] || {}).innerHTML || "",
      tooltip_top: (find("ll-tooltip")[0] || { style: {} }).style.top || "",
      cells: find("ll-cells").length,
      selection: state.selection,
      pins: state.pins,
      downloads: downloads.splice(0),
      asked: messages.splice(0),
      blobs: blobs.length,
      made: { ...made },
      thumbs: find("ll-thumb").length,
      open_thumbs: find("ll-open").length,
      text_spans: find("ll-text").flatMap((n) => n.all((m) => m.tagName === "SPAN")).length,
      text_positions: [...new Set(find("ll-text").flatMap((n) => n.all((m) => m.tagName === "SPAN").map((m) => Number(m.dataset.pos))))],
      text_lines: find("ll-line").map((n) => n.textContent),
      coloured_spans: find("ll-text").flatMap((n) => n.all((m) => m.tagName === "SPAN" && m.style.background)).length,
      fills: [...fills],
      marks: find("ll-mark").map((n) => n.className),
      popup: find("ll-popup").map((n) => n.textContent),
      legend_bar: (find("ll-legendbar")[0] || { textContent: "" }).textContent,
      feature: state.feature,
      state: Object.fromEntries((step.keys || []).map((k) => [k, state[k]])),
      attrs: step.attrs ? find(step.attrs[0]).map((n) => n.getAttribute(step.attrs[1])) : [],
      heatmap: find("ll-att-canvas").map((n) => ({ width: n.style.width, labels: n.dataset.labels })),
      texts: { title: (find("ll-title")[0] || { textContent: "" }).textContent,
        status: (find("ll-status")[0] || { textContent: "" }).textContent },
      tick_labels: el.all((n) => (n.attributes.class || "").includes("ll-tick-label")).map((n) => n.textContent),
    };
    fills.clear();
  }
}
// The text of every download, read at the end (Blob.text is asynchronous).
const csv = [];
for (const blob of blobs) csv.push(await blob.text());
process.stdout.write(JSON.stringify({ errors, reports, csv, sent: sent.length, timings: sandbox.llamaLensTimings || {} }));
