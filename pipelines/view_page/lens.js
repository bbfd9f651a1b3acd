// distlens view, lens page: a layer x position grid of one row's lens, drawn on a canvas that
// covers only the visible part of the grid (so 1,500 positions x 30 layers stays responsive),
// with the top-k of a cell on hover. window.distlensView exposes the state to tests.
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("distlens-data").textContent);
  const cache = new Map();
  const GX = 52, GY = 34; // gutters: layer labels, position labels
  const FIELD_NAMES = {
    probability: "top-1 probability", entropy: "entropy (nats)", target_rank: "target rank",
    target_logprob: "target probability", kl_to_final: "KL to final (nats)",
  };

  function decode(key, Type) {
    if (cache.has(key)) return cache.get(key);
    const s = atob(D.arrays[key]);
    const bytes = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
    const arr = new Type(bytes.buffer);
    cache.set(key, arr);
    return arr;
  }

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function select(id, label, options, onchange) {
    const wrap = el("label", {}, label + " ");
    const s = el("select", { id });
    for (const [value, text] of options) s.appendChild(el("option", { value: String(value) }, text));
    s.addEventListener("change", () => onchange(s.value));
    wrap.appendChild(s);
    return wrap;
  }

  // ---- state -----------------------------------------------------------------------------
  const rowsBySource = new Map();
  for (const r of D.rows) {
    if (!rowsBySource.has(r.source)) rowsBySource.set(r.source, []);
    rowsBySource.get(r.source).push(r);
  }
  const fields = ["probability", ...D.fields];
  const S = {
    source: D.rows[0].source, row: D.rows[0].row, lens: D.lenses[0], component: D.components[0],
    field: "probability", diff: false, layerLo: 0, layerHi: D.layers.length - 1, cw: 34, ch: 18,
  };
  const rowInfo = (row) => D.rows.find((r) => r.row === row);

  function baselineRow(row) {
    const r = rowInfo(row);
    const same = rowsBySource.get(r.source);
    const zero = same.find((x) => x.coefficient === 0);
    if (zero) return zero.row;
    const plain = same.find((x) => !x.steered && x.row !== row);
    return plain ? plain.row : null;
  }

  const views = new Map();
  function arrays(row) {
    const key = `${row}/${S.lens}/${S.component}`;
    if (views.has(key)) return views.get(key);
    const out = {
      ids: decode(`${key}/topk_ids`, Int32Array),
      lp: decode(`${key}/topk_logprobs`, Float32Array),
    };
    for (const f of D.fields) out[f] = decode(`${key}/${f}`, Float32Array);
    views.set(key, out);
    return out;
  }

  // value of the colour field at (layer index li, position p) of `row`; NaN where no lens
  function value(row, li, p) {
    const r = rowInfo(row);
    if (p >= r.length || !r.mask[p]) return NaN;
    const a = arrays(row), n = r.length, k = D.k;
    if (S.field === "probability") return Math.exp(a.lp[(li * n + p) * k]);
    if (S.field === "target_logprob") return Math.exp(a.target_logprob[li * n + p]);
    return a[S.field][li * n + p];
  }

  function cellValue(li, p) {
    const v = value(S.row, li, p);
    if (!S.diff) return v;
    const b = baselineRow(S.row);
    if (b === null) return NaN;
    return v - value(b, li, p);
  }

  // ---- layout ----------------------------------------------------------------------------
  document.title = `distlens: ${D.model || ""} ${D.path.split("/").slice(-2).join("/")}`;
  const header = el("header");
  header.appendChild(el("h1", {}, "distlens lens viewer"));
  header.appendChild(el("span", { class: "meta" }, `${D.model || "?"} · ${D.path} · ${D.rows.length} rows · ${D.layers.length} layers`));
  document.body.appendChild(header);
  if (!D.complete) document.body.appendChild(el("div", { class: "banner", id: "incomplete" }, "This store is not complete: rows of unfinished micro-batches are empty."));

  const controls = el("div", { id: "controls" });
  const sources = [...rowsBySource.keys()];
  controls.appendChild(select("sel-source", "prompt", sources.map((s) => [s, `#${rowsBySource.get(s)[0].corpus_index}: ${rowsBySource.get(s)[0].prompt_text.slice(0, 40)}`]), (v) => {
    S.source = Number(v); S.row = rowsBySource.get(S.source)[0].row; fillCoefficients(); render();
  }));
  const coefWrap = select("sel-coefficient", "coefficient", [], (v) => { S.row = Number(v); render(); });
  controls.appendChild(coefWrap);
  controls.appendChild(select("sel-component", "component", D.components.map((c) => [c, c]), (v) => { S.component = v; render(); }));
  const lensWrap = select("sel-lens", "lens", D.lenses.map((l) => [l, l]), (v) => { S.lens = v; render(); });
  if (D.lenses.length < 2) lensWrap.style.display = "none";
  controls.appendChild(lensWrap);
  controls.appendChild(select("sel-field", "colour", fields.map((f) => [f, FIELD_NAMES[f]]), (v) => { S.field = v; render(); }));
  const diffLabel = el("label", { id: "diff-label" }, "difference vs coefficient 0 ");
  const diffBox = el("input", { type: "checkbox", id: "diff" });
  diffBox.addEventListener("change", () => { S.diff = diffBox.checked; render(); });
  diffLabel.appendChild(diffBox);
  controls.appendChild(diffLabel);
  const lo = el("input", { type: "number", id: "layer-lo", min: 0, max: D.layers.length - 1, value: 0 });
  const hi = el("input", { type: "number", id: "layer-hi", min: 0, max: D.layers.length - 1, value: D.layers.length - 1 });
  const range = el("label", {}, "layers ");
  range.appendChild(lo); range.appendChild(document.createTextNode("–")); range.appendChild(hi);
  const onRange = () => {
    S.layerLo = Math.max(0, Math.min(Number(lo.value), D.layers.length - 1));
    S.layerHi = Math.max(S.layerLo, Math.min(Number(hi.value), D.layers.length - 1));
    render();
  };
  lo.addEventListener("change", onRange); hi.addEventListener("change", onRange);
  controls.appendChild(range);
  const zoom = el("input", { type: "range", id: "zoom", min: 4, max: 90, value: S.cw });
  zoom.addEventListener("input", () => { S.cw = Number(zoom.value); S.ch = Math.max(8, Math.min(22, Math.round(S.cw / 1.8))); render(); });
  const zl = el("label", {}, "zoom "); zl.appendChild(zoom);
  controls.appendChild(zl);
  document.body.appendChild(controls);

  const strip = el("div", { id: "strip" });
  document.body.appendChild(strip);
  const legend = el("div", { id: "legend" });
  document.body.appendChild(legend);
  const wrap = el("div", { id: "gridwrap" });
  const spacer = el("div", { id: "spacer" });
  const canvas = el("canvas", { id: "grid" });
  wrap.appendChild(spacer); wrap.appendChild(canvas);
  document.body.appendChild(wrap);
  const tip = el("div", { id: "tip" });
  document.body.appendChild(tip);

  function fillCoefficients() {
    const s = coefWrap.querySelector("select");
    s.innerHTML = "";
    const same = rowsBySource.get(S.source);
    for (const r of same) s.appendChild(el("option", { value: String(r.row) }, r.steered || r.coefficient !== 1 ? `× ${r.coefficient}` : "unsteered"));
    s.value = String(S.row);
    coefWrap.style.display = same.length > 1 ? "" : "none";
    diffLabel.style.display = same.length > 1 ? "" : "none";
  }

  function fillStrip() {
    const r = rowInfo(S.row);
    strip.innerHTML = "";
    r.tokens.forEach((t, p) => {
      if (p === r.prompt_length) strip.appendChild(el("span", { class: "sep", title: "generated from here" }, "│ generated →"));
      const span = el("span", { class: "t " + (p < r.prompt_length ? "prompt" : "gen"), "data-position": p, title: `position ${p} (id ${t})` }, D.vocab[t] ?? `#${t}`);
      span.addEventListener("click", () => scrollToPosition(p));
      strip.appendChild(span);
    });
  }

  // ---- colour ----------------------------------------------------------------------------
  let scale = { lo: 0, hi: 1, diverging: false };
  function computeScale() {
    const r = rowInfo(S.row);
    let m = 0;
    for (let li = S.layerLo; li <= S.layerHi; li++) for (let p = 0; p < r.length; p++) {
      const v = cellValue(li, p);
      if (!Number.isNaN(v)) m = Math.max(m, Math.abs(v));
    }
    if (S.diff) scale = { lo: -m || -1, hi: m || 1, diverging: true };
    else if (S.field === "probability" || S.field === "target_logprob") scale = { lo: 0, hi: 1, diverging: false };
    else if (S.field === "target_rank") scale = { lo: 0, hi: Math.log10(1 + m) || 1, diverging: false, log: true };
    else scale = { lo: 0, hi: m || 1, diverging: false };
  }
  function colour(v) {
    if (Number.isNaN(v)) return "#e4e6ea";
    if (scale.log) v = Math.log10(1 + v);
    if (scale.diverging) {
      const t = Math.max(-1, Math.min(1, v / scale.hi));
      const a = Math.abs(t);
      return t >= 0 ? `rgb(${255 - 200 * a},${255 - 140 * a},255)` : `rgb(255,${255 - 170 * a},${255 - 200 * a})`;
    }
    const t = Math.max(0, Math.min(1, (v - scale.lo) / (scale.hi - scale.lo)));
    const inv = S.field === "entropy" || S.field === "target_rank" || S.field === "kl_to_final"; // high = bad
    const u = inv ? 1 - t : t;
    return `rgb(${Math.round(247 - 205 * u)},${Math.round(251 - 140 * u)},${Math.round(255 - 75 * u)})`;
  }
  function drawLegend() {
    legend.innerHTML = "";
    const name = S.diff ? `${FIELD_NAMES[S.field]}: this row − coefficient 0` : FIELD_NAMES[S.field];
    legend.appendChild(document.createTextNode(name + ": "));
    const c = el("canvas", { width: 160, height: 12 });
    const g = c.getContext("2d");
    for (let i = 0; i < 160; i++) {
      let v = scale.lo + (scale.hi - scale.lo) * i / 159;
      if (scale.log) v = Math.pow(10, v) - 1;
      g.fillStyle = colour(v); g.fillRect(i, 0, 1, 12);
    }
    legend.appendChild(document.createTextNode(fmt(scale.log ? Math.pow(10, scale.lo) - 1 : scale.lo)));
    legend.appendChild(c);
    legend.appendChild(document.createTextNode(fmt(scale.log ? Math.pow(10, scale.hi) - 1 : scale.hi)));
  }
  const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toFixed(3));

  // ---- grid ------------------------------------------------------------------------------
  const shownLayers = () => { const out = []; for (let li = S.layerHi; li >= S.layerLo; li--) out.push(li); return out; };
  function draw() {
    const r = rowInfo(S.row);
    const W = wrap.clientWidth, H = wrap.clientHeight, dpr = window.devicePixelRatio || 1;
    if (canvas.width !== W * dpr || canvas.height !== H * dpr) {
      canvas.width = W * dpr; canvas.height = H * dpr; canvas.style.width = W + "px"; canvas.style.height = H + "px";
    }
    canvas.style.left = wrap.scrollLeft + "px"; canvas.style.top = wrap.scrollTop + "px";
    const g = canvas.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.fillStyle = "#fff"; g.fillRect(0, 0, W, H);
    const layers = shownLayers();
    const sx = wrap.scrollLeft, sy = wrap.scrollTop;
    const p0 = Math.max(0, Math.floor(sx / S.cw)), p1 = Math.min(r.length - 1, Math.ceil((sx + W - GX) / S.cw));
    const i0 = Math.max(0, Math.floor(sy / S.ch)), i1 = Math.min(layers.length - 1, Math.ceil((sy + H - GY) / S.ch));
    const a = arrays(S.row), n = r.length, k = D.k;
    g.font = `${Math.min(12, S.ch - 5)}px ui-monospace, monospace`;
    g.textBaseline = "middle";
    for (let i = i0; i <= i1; i++) {
      const li = layers[i], y = GY + i * S.ch - sy;
      for (let p = p0; p <= p1; p++) {
        const x = GX + p * S.cw - sx, v = cellValue(li, p);
        g.fillStyle = colour(v); g.fillRect(x, y, S.cw - 1, S.ch - 1);
        if (S.cw >= 22 && !Number.isNaN(v)) {
          const id = a.ids[(li * n + p) * k];
          let s = D.vocab[id] ?? `#${id}`;
          const fit = Math.floor((S.cw - 3) / 7);
          if (s.length > fit) s = s.slice(0, Math.max(1, fit - 1)) + "…";
          g.fillStyle = "#111"; g.fillText(s, x + 2, y + S.ch / 2);
        }
      }
    }
    g.fillStyle = "#f2f3f6"; g.fillRect(0, 0, W, GY); g.fillRect(0, 0, GX, H);
    g.fillStyle = "#334"; g.font = "11px system-ui, sans-serif";
    for (let i = i0; i <= i1; i++) g.fillText(`L${D.layers[layers[i]]}`, 6, GY + i * S.ch - sy + S.ch / 2);
    const every = Math.max(1, Math.ceil(40 / S.cw));
    for (let p = p0; p <= p1; p++) {
      if (p % every) continue;
      const x = GX + p * S.cw - sx;
      if (x < GX) continue;
      g.fillStyle = p < r.prompt_length ? "#334" : "#0a6b2a";
      g.fillText(String(p), x + 1, 10);
      if (S.cw >= 22) { let t = D.vocab[r.tokens[p]] ?? ""; if (t.length > 5) t = t.slice(0, 4) + "…"; g.fillText(t, x + 1, 24); }
    }
    if (r.prompt_length < r.length) { // the prompt | generated boundary
      const x = GX + r.prompt_length * S.cw - sx - 1;
      if (x >= GX) { g.fillStyle = "#c00"; g.fillRect(x - 1, 0, 2, H); }
    }
  }

  function render() {
    const r = rowInfo(S.row);
    const layers = shownLayers();
    spacer.style.width = GX + r.length * S.cw + "px";
    spacer.style.height = GY + layers.length * S.ch + "px";
    const diffable = baselineRow(S.row) !== null;
    if (!diffable && S.diff) { S.diff = false; diffBox.checked = false; }
    fillStrip(); computeScale(); drawLegend(); draw();
  }

  function scrollToPosition(p) {
    wrap.scrollLeft = Math.max(0, p * S.cw - wrap.clientWidth / 2);
    draw();
  }

  // ---- tooltip ---------------------------------------------------------------------------
  function cellAt(clientX, clientY) {
    const rect = wrap.getBoundingClientRect();
    const x = clientX - rect.left, y = clientY - rect.top;
    if (x < GX || y < GY) return null;
    const p = Math.floor((x - GX + wrap.scrollLeft) / S.cw), i = Math.floor((y - GY + wrap.scrollTop) / S.ch);
    const layers = shownLayers(), r = rowInfo(S.row);
    if (p < 0 || p >= r.length || i < 0 || i >= layers.length) return null;
    return { li: layers[i], p };
  }

  function showTip(cell, clientX, clientY) {
    const r = rowInfo(S.row);
    tip.innerHTML = "";
    for (const s of strip.querySelectorAll(".hl")) s.classList.remove("hl");
    if (!cell) { tip.style.display = "none"; return; }
    const { li, p } = cell, n = r.length, k = D.k, a = arrays(S.row);
    Object.assign(tip.dataset, { row: S.row, layer: D.layers[li], component: S.component, lens: S.lens, position: p });
    const next = p + 1 < n ? r.tokens[p + 1] : null;
    tip.appendChild(el("div", { class: "head" }, `row ${S.row} · layer ${D.layers[li]} · ${S.component} · position ${p} (${S.lens} lens)`));
    if (!r.mask[p]) {
      tip.appendChild(el("div", { class: "none" }, "no lens at this position (the last token, or not captured)"));
    } else {
      const table = el("table", { class: "topk" });
      for (let j = 0; j < k; j++) {
        const id = a.ids[(li * n + p) * k + j];
        if (id < 0) continue;
        const lp = a.lp[(li * n + p) * k + j];
        const tr = el("tr", { class: "topk-row", "data-id": id, "data-logprob": lp });
        tr.appendChild(el("td", {}, String(j + 1)));
        tr.appendChild(el("td", { class: "tok" }, JSON.stringify(D.vocab[id] ?? `#${id}`)));
        tr.appendChild(el("td", { class: "id" }, String(id)));
        tr.appendChild(el("td", { class: "prob" }, Math.exp(lp).toFixed(4)));
        table.appendChild(tr);
      }
      tip.appendChild(table);
      const stats = el("div", { class: "stats" });
      const add = (cls, label, v, digits) => {
        if (v === undefined || Number.isNaN(v)) return;
        const s = el("div", { class: cls, "data-value": v }, `${label} ${digits === 0 ? String(v) : v.toFixed(digits)}`);
        stats.appendChild(s);
      };
      if (a.entropy) add("entropy", "entropy (nats)", a.entropy[li * n + p], 4);
      if (next !== null) stats.appendChild(el("div", { class: "target", "data-id": next }, `target ${JSON.stringify(D.vocab[next] ?? `#${next}`)} (id ${next})`));
      if (a.target_rank) add("target-rank", "target rank", a.target_rank[li * n + p], 0);
      if (a.target_logprob) add("target-logprob", "target log-prob", a.target_logprob[li * n + p], 4);
      if (a.kl_to_final) add("kl", "KL to final (nats)", a.kl_to_final[li * n + p], 4);
      if (S.diff) add("diff", "difference", cellValue(li, p), 4);
      tip.appendChild(stats);
    }
    const hl = strip.querySelector(`span[data-position="${p}"]`);
    if (hl) { // keep the hovered position's token in sight in the strip
      hl.classList.add("hl");
      const top = hl.offsetTop - strip.offsetTop;
      if (top < strip.scrollTop || top > strip.scrollTop + strip.clientHeight - 16) strip.scrollTop = Math.max(0, top - 24);
    }
    tip.style.display = "block";
    const w = tip.offsetWidth, h = tip.offsetHeight;
    tip.style.left = Math.min(clientX + 14, window.innerWidth - w - 4) + "px";
    tip.style.top = Math.min(clientY + 14, window.innerHeight - h - 4) + "px";
  }

  canvas.addEventListener("mousemove", (e) => showTip(cellAt(e.clientX, e.clientY), e.clientX, e.clientY));
  canvas.addEventListener("mouseleave", () => showTip(null));
  wrap.addEventListener("scroll", () => requestAnimationFrame(draw));
  wrap.addEventListener("wheel", (e) => { // ctrl + wheel zooms
    if (!e.ctrlKey) return;
    e.preventDefault();
    zoom.value = String(Math.max(4, Math.min(90, S.cw + (e.deltaY < 0 ? 4 : -4))));
    zoom.dispatchEvent(new Event("input"));
  }, { passive: false });
  window.addEventListener("resize", draw);

  fillCoefficients();
  render();

  // ---- for tests and the console ---------------------------------------------------------
  window.distlensView = {
    state: S,
    readyMs: performance.now(),
    // the grid's values as drawn (before colouring): [layer index][position], null where no lens
    grid() {
      const r = rowInfo(S.row), out = [];
      for (let li = 0; li < D.layers.length; li++) {
        const line = [];
        for (let p = 0; p < r.length; p++) { const v = cellValue(li, p); line.push(Number.isNaN(v) ? null : v); }
        out.push(line);
      }
      return { row: S.row, lens: S.lens, component: S.component, field: S.field, diff: S.diff, values: out };
    },
    // the client coordinates of a cell's centre, scrolling it into view first
    cellCenter(layerIndex, p) {
      const layers = shownLayers(), i = layers.indexOf(layerIndex);
      wrap.scrollLeft = Math.max(0, p * S.cw - (wrap.clientWidth - GX) / 2);
      wrap.scrollTop = Math.max(0, i * S.ch - (wrap.clientHeight - GY) / 2);
      draw();
      const rect = wrap.getBoundingClientRect();
      return { x: rect.left + GX + p * S.cw - wrap.scrollLeft + S.cw / 2, y: rect.top + GY + i * S.ch - wrap.scrollTop + S.ch / 2 };
    },
  };
  document.body.dataset.ready = "1";
})();
