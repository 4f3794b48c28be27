// Line charts drawn as inline SVG: no library, no CDN. Every series keeps all its points (the browser test
// counts them); only sparklines are thinned.

const SVG = "http://www.w3.org/2000/svg";

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// Round tick values: 1, 2 or 5 times a power of ten.
function ticks(lo, hi, count) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

export function formatNumber(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (Number.isInteger(v)) return v.toLocaleString("en-US");
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-4) return v.toExponential(2);
  return v.toPrecision(4).replace(/\.?0+$/, "");
}

function extent(series, key) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const s of series) for (const p of s.points) {
    lo = Math.min(lo, p[key]);
    hi = Math.max(hi, p[key]);
  }
  if (lo === Infinity) return [0, 1];
  if (lo === hi) return [lo - (Math.abs(lo) || 1) * 0.05, hi + (Math.abs(hi) || 1) * 0.05];
  return [lo, hi];
}

// series: [{name, label, color, points: [{x, y}], markers: bool}]
export function lineChart(container, series, { width = 640, height = 260, xLabel = "step", yLabel = "" } = {}) {
  const m = { top: 14, right: 16, bottom: 34, left: 58 };
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": yLabel });
  const [x0, x1] = extent(series, "x");
  const [y0, y1] = extent(series, "y");
  const pad = (y1 - y0) * 0.06;
  const ylo = y0 - pad;
  const yhi = y1 + pad;
  const sx = (x) => m.left + ((x - x0) / (x1 - x0 || 1)) * (width - m.left - m.right);
  const sy = (y) => height - m.bottom - ((y - ylo) / (yhi - ylo || 1)) * (height - m.top - m.bottom);

  const grid = el("g", { class: "grid" }, svg);
  for (const t of ticks(ylo, yhi, 6)) {
    el("line", { x1: m.left, x2: width - m.right, y1: sy(t), y2: sy(t) }, grid);
    el("text", { x: m.left - 8, y: sy(t) + 4, "text-anchor": "end" }, grid).textContent = formatNumber(t);
  }
  for (const t of ticks(x0, x1, 6)) {
    if (!Number.isInteger(t)) continue;
    el("line", { x1: sx(t), x2: sx(t), y1: m.top, y2: height - m.bottom, class: "vgrid" }, grid);
    el("text", { x: sx(t), y: height - m.bottom + 16, "text-anchor": "middle" }, grid).textContent = formatNumber(t);
  }
  el("text", { x: width - m.right, y: height - 4, "text-anchor": "end", class: "axis-label" }, svg).textContent = xLabel;

  for (const s of series) {
    if (!s.points.length) continue;
    const coords = s.points.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" ");
    el("polyline", {
      points: coords,
      class: `line ${s.name}`,
      stroke: s.color,
      "data-series": s.name,
      "data-count": s.points.length,
    }, svg);
    if (s.markers) {
      const g = el("g", { class: `markers ${s.name}`, "data-series": s.name }, svg);
      for (const p of s.points) {
        const c = el("circle", { cx: sx(p.x), cy: sy(p.y), r: 3.5, fill: s.color }, g);
        el("title", {}, c).textContent = `${s.label} at step ${p.x}: ${formatNumber(p.y)}`;
      }
    }
  }

  // Hover: a vertical rule and the values of every series at the nearest step.
  const rule = el("line", { class: "hover-rule", y1: m.top, y2: height - m.bottom, visibility: "hidden" }, svg);
  const tip = el("text", { class: "hover-tip", y: m.top + 12, visibility: "hidden" }, svg);
  svg.addEventListener("mousemove", (ev) => {
    const box = svg.getBoundingClientRect();
    const x = x0 + (((ev.clientX - box.left) * (width / box.width) - m.left) / (width - m.left - m.right)) * (x1 - x0);
    const parts = [];
    let at = null;
    for (const s of series) {
      let best = null;
      for (const p of s.points) if (!best || Math.abs(p.x - x) < Math.abs(best.x - x)) best = p;
      if (best) {
        at = at ?? best.x;
        parts.push(`${s.label} ${formatNumber(best.y)}`);
      }
    }
    if (at === null) return;
    rule.setAttribute("x1", sx(at));
    rule.setAttribute("x2", sx(at));
    tip.setAttribute("x", Math.min(sx(at) + 6, width - 200));
    tip.textContent = `step ${at}: ${parts.join(" · ")}`;
    rule.setAttribute("visibility", "visible");
    tip.setAttribute("visibility", "visible");
  });
  svg.addEventListener("mouseleave", () => {
    rule.setAttribute("visibility", "hidden");
    tip.setAttribute("visibility", "hidden");
  });

  container.replaceChildren(svg);
  if (series.length > 1) {
    const legend = document.createElement("div");
    legend.className = "legend";
    for (const s of series) {
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = s.color; // CSSOM, not a style attribute: allowed by the API's CSP
      item.append(swatch, `${s.label} (${s.points.length})`);
      legend.appendChild(item);
    }
    container.appendChild(legend);
  }
}

export function sparkline(values, { width = 120, height = 28, color = "#2f6fdf", maxPoints = 120 } = {}) {
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, class: "sparkline", width, height });
  if (values.length < 2) return svg;
  const stride = Math.ceil(values.length / maxPoints);
  const pts = values.filter((_, i) => i % stride === 0 || i === values.length - 1);
  const lo = Math.min(...pts);
  const hi = Math.max(...pts);
  const sx = (i) => 1 + (i / (pts.length - 1)) * (width - 2);
  const sy = (v) => height - 2 - ((v - lo) / (hi - lo || 1)) * (height - 4);
  el("polyline", { points: pts.map((v, i) => `${sx(i).toFixed(1)},${sy(v).toFixed(1)}`).join(" "), stroke: color }, svg);
  el("circle", { cx: sx(pts.length - 1), cy: sy(pts[pts.length - 1]), r: 2, fill: color }, svg);
  return svg;
}
