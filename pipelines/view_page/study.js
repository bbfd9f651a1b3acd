// distlens view, study page: per dataset, mean propensity against the steering coefficient with
// its bootstrap 95% band and every test item's own line, the per-item slopes (anti-steerable
// items, slope < 0, in red) and, when the study measured it, steerability against its side effect
// (mean KL on neutral prompts; perplexity in each point's tooltip). Plain SVG; window.distlensView
// exposes the data to tests.
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("distlens-data").textContent);
  const NS = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs, text) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const el = (tag, attrs, text) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const f3 = (v) => v.toFixed(3);

  function curve(d) {
    const W = 380, H = 250, L = 48, R = 10, T = 10, B = 34;
    const xs = d.coefficients, lo = Math.min(...xs), hi = Math.max(...xs);
    const ys = [...d.band.flat(), ...d.propensity.flat(), 0];
    const ylo = Math.min(...ys), yhi = Math.max(...ys);
    const X = (x) => L + (hi === lo ? 0.5 : (x - lo) / (hi - lo)) * (W - L - R);
    const Y = (y) => T + (yhi === ylo ? 0.5 : 1 - (y - ylo) / (yhi - ylo)) * (H - T - B);
    const s = svg("svg", { width: W, height: H, class: "curve", "data-dataset": d.dataset });
    s.appendChild(svg("line", { x1: L, x2: W - R, y1: Y(0), y2: Y(0), stroke: "#999", "stroke-width": 0.8 }));
    d.propensity.forEach((row, i) => {
      const anti = d.slopes[i] < 0;
      const pts = row.map((y, j) => `${X(xs[j])},${Y(y)}`).join(" ");
      s.appendChild(svg("polyline", { points: pts, fill: "none", stroke: anti ? "#d33" : "#8aa0c0", "stroke-width": 0.7,
        "stroke-opacity": 0.5, class: "item" + (anti ? " anti" : ""), "data-item": i }));
    });
    const upper = d.band.map((b, j) => `${X(xs[j])},${Y(b[1])}`);
    const lower = d.band.map((b, j) => `${X(xs[j])},${Y(b[0])}`).reverse();
    s.appendChild(svg("polygon", { points: [...upper, ...lower].join(" "), fill: "#2a6fdb", "fill-opacity": 0.2, class: "band" }));
    s.appendChild(svg("polyline", { points: d.mean.map((y, j) => `${X(xs[j])},${Y(y)}`).join(" "), fill: "none",
      stroke: "#2a6fdb", "stroke-width": 2, class: "mean-line" }));
    d.mean.forEach((y, j) => {
      const c = svg("circle", { cx: X(xs[j]), cy: Y(y), r: 3.5, fill: "#2a6fdb", class: "mean",
        "data-coefficient": xs[j], "data-value": y, "data-lo": d.band[j][0], "data-hi": d.band[j][1] });
      c.appendChild(svg("title", {}, `coefficient ${xs[j]}: mean propensity ${f3(y)} [${f3(d.band[j][0])}, ${f3(d.band[j][1])}]`));
      s.appendChild(c);
    });
    for (const x of xs) s.appendChild(svg("text", { x: X(x), y: H - B + 14, "text-anchor": "middle" }, String(x)));
    for (const y of [ylo, 0, yhi]) s.appendChild(svg("text", { x: L - 4, y: Y(y) + 3, "text-anchor": "end" }, f3(y)));
    s.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "steering coefficient"));
    s.appendChild(svg("text", { x: 10, y: T + (H - T - B) / 2, transform: `rotate(-90 10 ${T + (H - T - B) / 2})`,
      "text-anchor": "middle" }, "propensity (logit diff)"));
    return s;
  }

  function slopes(d) {
    const W = 380, H = 70, L = 12, R = 12;
    const v = d.slopes, lo = Math.min(...v, 0), hi = Math.max(...v, 0);
    const X = (x) => L + (hi === lo ? 0.5 : (x - lo) / (hi - lo)) * (W - L - R);
    const s = svg("svg", { width: W, height: H, class: "slopes", "data-dataset": d.dataset });
    s.appendChild(svg("line", { x1: X(0), x2: X(0), y1: 4, y2: H - 22, stroke: "#999" }));
    v.forEach((x, i) => {
      const c = svg("circle", { cx: X(x), cy: 12 + (i * 7) % (H - 38), r: 3, fill: x < 0 ? "#d33" : "#2a6fdb",
        class: "slope" + (x < 0 ? " anti" : ""), "data-item": i, "data-slope": x });
      c.appendChild(svg("title", {}, `item ${i}: slope ${f3(x)}${x < 0 ? " (anti-steerable)" : ""}`));
      s.appendChild(c);
    });
    s.appendChild(svg("text", { x: X(lo), y: H - 8 }, f3(lo)));
    s.appendChild(svg("text", { x: X(hi), y: H - 8, "text-anchor": "end" }, f3(hi)));
    s.appendChild(svg("text", { x: W / 2, y: H - 8, "text-anchor": "middle" }, "per-item slope"));
    return s;
  }

  function cost(d) {
    const W = 380, H = 220, L = 48, R = 10, T = 10, B = 34, c = d.cost;
    const base = d.mean[c.coefficients.indexOf(0)] ?? d.mean[0];
    const ys = d.mean.map((m) => m - base), xs = c.kl;
    const xhi = Math.max(...xs, 1e-9), ylo = Math.min(...ys, 0), yhi = Math.max(...ys, 0);
    const X = (x) => L + (x / xhi) * (W - L - R);
    const Y = (y) => T + (yhi === ylo ? 0.5 : 1 - (y - ylo) / (yhi - ylo)) * (H - T - B);
    const s = svg("svg", { width: W, height: H, class: "cost", "data-dataset": d.dataset });
    s.appendChild(svg("line", { x1: L, x2: W - R, y1: Y(0), y2: Y(0), stroke: "#999", "stroke-width": 0.8 }));
    s.appendChild(svg("polyline", { points: xs.map((x, j) => `${X(x)},${Y(ys[j])}`).join(" "), fill: "none",
      stroke: "#b05a00", "stroke-width": 1.5 }));
    xs.forEach((x, j) => {
      const p = svg("circle", { cx: X(x), cy: Y(ys[j]), r: 3.5, fill: "#b05a00", class: "cost-point" });
      p.appendChild(svg("title", {}, `coefficient ${c.coefficients[j]}: KL ${x.toExponential(3)}, ` +
        `perplexity ${c.perplexity[j].toFixed(3)}, effect ${f3(ys[j])}`));
      s.appendChild(p);
    });
    s.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "mean KL(unsteered || steered), neutral prompts"));
    s.appendChild(svg("text", { x: L - 4, y: Y(yhi) + 3, "text-anchor": "end" }, f3(yhi)));
    s.appendChild(svg("text", { x: L - 4, y: Y(ylo) + 3, "text-anchor": "end" }, f3(ylo)));
    return s;
  }

  document.title = `distlens study: ${D.path.split("/").slice(-2).join("/")}`;
  const header = el("header");
  header.appendChild(el("h1", {}, "distlens steering study"));
  header.appendChild(el("span", { class: "meta" }, `${D.path} · ${D.datasets.length} dataset(s)`));
  document.body.appendChild(header);
  const main = el("div", { class: "study" });
  for (const d of D.datasets) {
    const card = el("div", { class: "dataset", "data-dataset": d.dataset });
    card.appendChild(el("h2", {}, `${d.dataset} · layer ${d.layer} ${d.site}`));
    const anti = d.slopes.filter((x) => x < 0).length;
    card.appendChild(el("div", { class: "note" }, `mean of slopes ${f3(d.mean_of_slopes)} [${f3(d.mean_of_slopes_ci95[0])}, ` +
      `${f3(d.mean_of_slopes_ci95[1])}] · slope of mean ${f3(d.slope_of_mean)} · anti-steerable ${anti} of ${d.slopes.length}`));
    card.appendChild(curve(d));
    card.appendChild(slopes(d));
    if (d.cost) card.appendChild(cost(d));
    main.appendChild(card);
  }
  document.body.appendChild(main);
  window.distlensView = { data: D, readyMs: performance.now() };
  document.body.dataset.ready = "1";
})();
