// The dashboard: a jobs list, a job page and a comparison of picked jobs, polling the API every couple of seconds.
// Data from the API is only ever inserted as text (textContent), never as HTML. The API serves it under a strict
// Content-Security-Policy: no inline script, handler or style attribute here (styles go through element.style).

import { formatNumber, lineChart, sparkline } from "./chart.js";

const POLL_MS = 2000;
const METRICS_PAGE = 10000;
// Eval values are merged into a step's row after its train values: re-read a few steps back on each poll.
const METRICS_OVERLAP = 5;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const COLORS = { loss: "#2f6fdf", eval: "#e0671b", lr: "#2a9d6f" };
// One colour per compared job (its train loss line and its eval loss dots).
const PALETTE = ["#2f6fdf", "#e0671b", "#2a9d6f", "#9b4dca", "#d2423b", "#8a6d1f", "#1b8a9b", "#6b7686"];
const MAX_COMPARED = PALETTE.length;

const KEY_STORAGE = "qaa_api_key";

const state = { key: localStorage.getItem(KEY_STORAGE), linkKey: null, metrics: new Map(), timer: null, picked: new Set() };

// --- API -----------------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  let res;
  try {
    res = await fetch(path, { ...options, headers });
  } catch (err) {
    setConn(false, "API unreachable");
    throw new ApiError(0, "the API is unreachable");
  }
  setConn(true);
  if (res.status === 401) {
    askForKey("The API refused the key (missing, unknown or revoked).");
    throw new ApiError(401, "unauthorized");
  }
  if (!res.ok) {
    let detail = res.statusText;
    try { detail = (await res.json()).detail || detail; } catch { /* not a problem+json body */ }
    throw new ApiError(res.status, detail);
  }
  return options.raw ? res : res.json();
}

// Metric points of a job, fetched incrementally and merged by step. A finished job is read whole once more
// (so values merged late, like a last eval, are all in) and then served from memory.
async function loadMetrics(jobId, status) {
  let entry = state.metrics.get(jobId);
  if (entry?.final) return entry.sorted;
  const terminal = TERMINAL.has(status);
  if (!entry || terminal) {
    entry = { byStep: new Map(), last: -1 };
    state.metrics.set(jobId, entry);
  }
  let after = Math.max(-1, entry.last - METRICS_OVERLAP);
  for (;;) {
    const page = await api(`/v1/jobs/${encodeURIComponent(jobId)}/metrics?after_step=${after}&limit=${METRICS_PAGE}`);
    for (const p of page.points) entry.byStep.set(p.step, p);
    after = page.next_after_step;
    entry.last = Math.max(entry.last, after);
    if (page.points.length < METRICS_PAGE) break;
  }
  entry.sorted = [...entry.byStep.values()].sort((a, b) => a.step - b.step);
  entry.final = terminal;
  return entry.sorted;
}

// --- DOM helpers ---------------------------------------------------------------------------------------------

function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

const badge = (status) => h("span", { class: `badge ${status}` }, status);

function progressBar(progress, status) {
  const pct = progress.steps ? Math.min(100, (100 * progress.step) / progress.steps) : 0;
  const bar = h("div", { class: `bar ${status}` });
  bar.style.width = `${Number(pct.toFixed(1))}%`; // CSSOM, not a style attribute: allowed by the CSP
  return h("div", { class: "progress", title: `${progress.step} / ${progress.steps} steps` },
    bar, h("span", {}, `${progress.step} / ${progress.steps}`));
}

function ago(iso) {
  if (!iso) return "–";
  const s = (Date.now() - new Date(iso).getTime()) / 1000;
  if (s < 60) return `${Math.max(0, Math.round(s))} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

function duration(job) {
  if (!job.started_at) return "–";
  const end = job.finished_at ? new Date(job.finished_at) : new Date();
  const s = Math.round((end - new Date(job.started_at)) / 1000);
  return s < 120 ? `${s} s` : `${Math.floor(s / 60)} min ${s % 60} s`;
}

const method = (job) => job.method?.kind ?? "qaa";
const backend = (job) => job.backend ?? "–";

function setConn(ok, text) {
  const conn = document.getElementById("conn");
  conn.className = `conn ${ok ? "ok" : "down"}`;
  conn.textContent = `● ${text || (ok ? "live" : "offline")}`;
}

function showError(target, err) {
  if (err.status === 401) return;
  target.replaceChildren(h("div", { class: "callout error" }, err.message));
}

// --- jobs list -----------------------------------------------------------------------------------------------

async function renderList(view) {
  const page = await api("/v1/jobs?limit=100");
  const rows = await Promise.all(page.jobs.map(async (job) => {
    let losses = [];
    try {
      losses = (await loadMetrics(job.id, job.status)).map((p) => p.loss).filter((v) => typeof v === "number");
    } catch { /* a job without metrics yet */ }
    const last = losses.length ? formatNumber(losses[losses.length - 1]) : "–";
    const pick = h("input", { type: "checkbox", class: "pick", "data-job": job.id, "aria-label": `compare ${job.id}` });
    pick.checked = state.picked.has(job.id);
    pick.addEventListener("click", (ev) => ev.stopPropagation()); // picking is not opening the job
    pick.addEventListener("change", () => {
      if (pick.checked) state.picked.add(job.id);
      else state.picked.delete(job.id);
      updateCompareButton();
    });
    return h("tr", { class: "job-row", "data-job": job.id, onclick: () => { location.hash = `#/jobs/${job.id}`; } },
      h("td", { class: "pick" }, pick),
      h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.name || job.id), h("div", { class: "muted mono" }, job.id)),
      h("td", {}, badge(job.status)),
      h("td", { class: "method" }, method(job)),
      h("td", { class: "backend mono" }, backend(job)),
      h("td", { class: "model" }, h("div", { class: "mono" }, job.model || "–"),
        h("div", { class: "muted mono" }, job.dataset || "–")),
      h("td", {}, progressBar(job.progress, job.status)),
      h("td", { class: "spark" }, sparkline(losses), h("span", { class: "mono" }, last)),
      h("td", { class: "muted" }, ago(job.created_at)));
  }));
  const counts = {};
  for (const j of page.jobs) counts[j.status] = (counts[j.status] || 0) + 1;
  const compare = h("button", { type: "button", id: "compare-button" });
  compare.addEventListener("click", () => { location.hash = `#/compare/${[...state.picked].join(",")}`; });
  view.replaceChildren(
    h("div", { class: "page-head" },
      h("h1", {}, "Jobs"),
      h("div", { class: "summary" }, Object.entries(counts).map(([s, n]) => h("span", {}, badge(s), ` ${n}`)), compare)),
    page.jobs.length
      ? h("div", { class: "card flush" }, h("table", { class: "jobs" },
        h("thead", {}, h("tr", {}, ["", "Job", "State", "Method", "Backend", "Model / dataset", "Progress", "Loss", "Created"].map((t) => h("th", {}, t)))),
        h("tbody", {}, rows)))
      : h("div", { class: "card empty" }, h("p", {}, "No jobs yet."),
        h("p", { class: "muted" }, "Submit one with ", h("code", {}, "qaa-client submit examples/tiny.yaml"), ".")));
}

function updateCompareButton() {
  const button = document.getElementById("compare-button");
  if (!button) return;
  const n = state.picked.size;
  button.disabled = n < 2 || n > MAX_COMPARED;
  button.textContent = n > MAX_COMPARED ? `Compare (at most ${MAX_COMPARED})` : `Compare ${n} jobs`;
}

// --- comparison ----------------------------------------------------------------------------------------------

// The columns `qaa-client compare` prints: [label, evaluation keys tried in order, digits].
const COMPARE_COLUMNS = [
  ["trainable params", ["trainable_params"]], ["trainable share", ["trainable_share"]], ["BLEU", ["bleu"]],
  ["ROUGE-L", ["rougeL", "rouge_l"]], ["BERTScore F1", ["bertscore_f1"]], ["eval loss", ["eval_loss"]],
  ["s/step", ["seconds_per_step"]], ["peak MB", ["peak_memory_mb"]],
];

// A score of a job by name: from its evaluation, or for an evaluate job from its scores on the backend.
function scoreOf(job, names) {
  const e = job.evaluation || {};
  for (const source of [e, e.on_backend || {}]) {
    for (const n of names) if (typeof source[n] === "number") return source[n];
  }
  return null;
}

async function renderCompare(view, ids) {
  const jobs = await Promise.all(ids.map((id) => api(`/v1/jobs/${encodeURIComponent(id)}`)));
  const curves = await Promise.all(jobs.map((j) => loadMetrics(j.id, j.status)));
  const box = h("div", { class: "chart-box", id: "compare-chart" });
  const label = (job) => job.name || job.id;
  view.replaceChildren(
    h("div", { class: "page-head" },
      h("div", {}, h("a", { href: "#/", class: "muted" }, "← all jobs"), h("h1", {}, `Comparing ${jobs.length} jobs`))),
    h("section", { class: "card" }, h("h2", {}, "Loss: train (lines), eval (dots)"), box),
    h("section", { class: "card flush", id: "compare-scores" }, h("table", { class: "jobs" },
      h("thead", {}, h("tr", {}, ["Job", "State", "Method", "Backend", ...COMPARE_COLUMNS.map(([t]) => t)].map((t) => h("th", {}, t)))),
      h("tbody", {}, jobs.map((job, i) => {
        const swatch = h("i", { class: "swatch" });
        swatch.style.background = PALETTE[i]; // CSSOM, not a style attribute: allowed by the CSP
        return h("tr", { "data-job": job.id },
          h("td", {}, swatch, h("a", { href: `#/jobs/${job.id}` }, label(job))), h("td", {}, badge(job.status)),
          h("td", { class: "method" }, method(job)), h("td", { class: "backend mono" }, backend(job)),
          COMPARE_COLUMNS.map(([t, names]) => {
            const v = scoreOf(job, names);
            const text = v === null ? "–" : t === "trainable share" ? `${(100 * v).toFixed(4)}%` : formatNumber(v);
            return h("td", { class: "mono", "data-column": t }, text);
          }));
      })))));
  const lines = jobs.flatMap((job, i) => [
    series(curves[i], "loss", `loss-${i}`, `${label(job)} train`, PALETTE[i]),
    series(curves[i], "eval_loss", `eval-${i}`, `${label(job)} eval`, PALETTE[i], true),
  ]);
  if (lines.some((l) => l.points.length)) lineChart(box, lines, { yLabel: "loss" });
  else box.replaceChildren(h("p", { class: "muted" }, "No loss recorded yet."));
  document.title = `Comparing ${jobs.length} jobs · QAA`;
  return jobs.every((j) => TERMINAL.has(j.status));
}

// --- job page ------------------------------------------------------------------------------------------------

const USAGE_LABELS = [
  ["circuits", "circuits"], ["shots", "shots"], ["primitive_calls", "primitive calls"],
  ["transpile_hits", "transpile cache hits"], ["transpile_misses", "transpile cache misses"], ["qpu_seconds", "QPU seconds"],
];

function usageCard(job) {
  const usage = job.usage || {};
  const known = USAGE_LABELS.filter(([k]) => k in usage);
  const rest = Object.keys(usage).filter((k) => !USAGE_LABELS.some(([u]) => u === k) && typeof usage[k] === "number");
  const items = [...known.map(([k, label]) => [label, usage[k]]), ...rest.map((k) => [k.replaceAll("_", " "), usage[k]])];
  return h("section", { class: "card", id: "usage" }, h("h2", {}, "Quantum counters"),
    items.length
      ? h("dl", { class: "counters" }, items.map(([label, v]) => h("div", {}, h("dt", {}, label), h("dd", {}, formatNumber(v)))))
      : h("p", { class: "muted" }, backend(job) === "exact" || method(job) !== "qaa"
        ? "This job runs no circuits (exact engine or a classical method)." : "No circuits counted yet."));
}

function flatten(obj, prefix = "", out = []) {
  for (const [k, v] of Object.entries(obj || {})) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, key, out);
    else out.push([key, v]);
  }
  return out;
}

function evaluationCard(job) {
  const rows = flatten(job.evaluation);
  return h("section", { class: "card", id: "evaluation" }, h("h2", {}, "Evaluation"),
    rows.length
      ? h("table", { class: "kv" }, h("tbody", {}, rows.map(([k, v]) =>
        h("tr", {}, h("th", {}, k), h("td", { class: "mono" }, typeof v === "number" ? formatNumber(v) : JSON.stringify(v))))))
      : h("p", { class: "muted" }, TERMINAL.has(job.status) ? "No evaluation was recorded." : "Scores appear when training ends."));
}

// An evaluate job (`kind: evaluate`): the same adapter on the exact engine and on the backend, side by side.
function gapCard(job) {
  const e = job.evaluation;
  if (!e || !e.gap || !e.exact || !e.on_backend) return null;
  const names = Object.keys(e.exact);
  const signed = (v) => (typeof v === "number" && v > 0 ? "+" : "") + formatNumber(v);
  return h("section", { class: "card", id: "hardware-gap" },
    h("h2", {}, `Hardware gap: ${e.backend}`),
    h("p", { class: "muted" }, `Adapter of ${e.adapter_from} on ${e.examples} test examples, ${e.shots ?? "exact"} shots, `
      + `mitigation ${e.mitigation ? JSON.stringify(e.mitigation) : "none"}. Readout error against the exact engine on the same inputs: `
      + `mean ${formatNumber(e.gap.readout_mean_abs)}, max ${formatNumber(e.gap.readout_max_abs)}.`),
    h("table", { class: "kv" },
      h("thead", {}, h("tr", {}, ["", "exact", e.backend, "gap"].map((t) => h("th", {}, t)))),
      h("tbody", {}, names.map((k) => h("tr", { "data-metric": k }, h("th", {}, k),
        h("td", { class: "mono" }, formatNumber(e.exact[k])), h("td", { class: "mono" }, formatNumber(e.on_backend[k])),
        h("td", { class: "mono gap" }, signed(e.gap[k])))))));
}

async function download(jobId, artifact, button) {
  button.disabled = true;
  try {
    const res = await api(artifact.url, { raw: true, headers: { Accept: "*/*" } });
    const url = URL.createObjectURL(await res.blob());
    const a = h("a", { href: url, download: artifact.name.split("/").pop() });
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } finally {
    button.disabled = false;
  }
}

function artifactsCard(job, artifacts) {
  const jobId = job.id;
  const size = (n) => (n < 1024 ? `${n} B` : n < 1 << 20 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / (1 << 20)).toFixed(1)} MiB`);
  return h("section", { class: "card", id: "artifacts" }, h("h2", {}, "Artifacts"),
    artifacts.length
      ? h("ul", { class: "artifacts" }, artifacts.map((a) => {
        const button = h("button", { class: "ghost small", type: "button" }, "Download");
        button.addEventListener("click", () => download(jobId, a, button));
        return h("li", {}, h("span", { class: "mono" }, a.name), h("span", { class: "muted" }, size(a.size)), button);
      }))
      : h("p", { class: "muted" }, TERMINAL.has(job.status)
        ? "This job stored no artifacts." : "None yet: the adapter, metrics and samples are stored when the job ends."));
}

function series(points, key, name, label, color, markers = false) {
  return { name, label, color, markers, points: points.filter((p) => typeof p[key] === "number").map((p) => ({ x: p.step, y: p[key] })) };
}

async function renderJob(view, jobId) {
  const job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
  const points = await loadMetrics(jobId, job.status);
  const artifacts = await api(`/v1/jobs/${encodeURIComponent(jobId)}/artifacts`);
  const last = points.length ? points[points.length - 1] : {};

  const cancel = h("button", { class: "danger", type: "button" }, "Cancel job");
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    await api(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" });
    refresh();
  });

  const lossBox = h("div", { class: "chart-box", id: "loss-chart" });
  const lrBox = h("div", { class: "chart-box small", id: "lr-chart" });
  const spec = job.spec || {};
  view.replaceChildren(...[
    h("div", { class: "page-head" },
      h("div", {}, h("a", { href: "#/", class: "muted" }, "← all jobs"),
        h("h1", {}, job.name || job.id, " ", badge(job.status)), h("div", { class: "muted mono" }, job.id)),
      TERMINAL.has(job.status) || job.status === "cancelling" ? null : cancel),
    job.error ? h("div", { class: "callout error" }, h("strong", {}, "Error: "), job.error) : null,
    h("section", { class: "card facts" },
      h("div", { class: "fact wide" }, h("label", {}, "Progress"), progressBar(job.progress, job.status)),
      [["Method", method(job)], ["Backend", backend(job)], ["Model", job.model ?? spec.model],
        ["Dataset", job.dataset ?? spec.dataset],
        ["Loss", formatNumber(last.loss)], ["Learning rate", formatNumber(last.lr)], ["Attempts", job.attempts],
        ["Running for", duration(job)], ["Created", ago(job.created_at)], ["Queue", job.queue]]
        .map(([k, v]) => h("div", { class: "fact" }, h("label", {}, k), h("span", { class: "mono" }, v ?? "–")))),
    h("div", { class: "grid2" },
      h("section", { class: "card" }, h("h2", {}, "Loss"), lossBox),
      h("div", { class: "stack" },
        h("section", { class: "card" }, h("h2", {}, "Learning rate"), lrBox),
        usageCard(job))),
    gapCard(job),
    h("div", { class: "grid2" }, evaluationCard(job), artifactsCard(job, artifacts)),
  ].filter(Boolean));

  const loss = series(points, "loss", "loss", "train loss", COLORS.loss);
  const evalLoss = series(points, "eval_loss", "eval_loss", "eval loss", COLORS.eval, true);
  if (loss.points.length || evalLoss.points.length) lineChart(lossBox, [loss, evalLoss], { yLabel: "loss" });
  else lossBox.replaceChildren(h("p", { class: "muted" }, "Waiting for the first step…"));
  const lr = series(points, "lr", "lr", "learning rate", COLORS.lr);
  if (lr.points.length) lineChart(lrBox, [lr], { height: 150, yLabel: "learning rate" });
  else lrBox.replaceChildren(h("p", { class: "muted" }, "–"));
  document.title = `${job.name || job.id} · ${job.status} · QAA`;
  return TERMINAL.has(job.status);
}

// --- routing, polling, key -----------------------------------------------------------------------------------

async function refresh() {
  clearTimeout(state.timer);
  const route = location.hash.replace(/^#/, "") || "/";
  const view = document.getElementById("view");
  const match = route.match(/^\/jobs\/([\w-]+)$/);
  const compared = route.match(/^\/compare\/([\w,-]+)$/);
  let done = false;
  try {
    if (match) done = await renderJob(view, match[1]);
    else if (compared) done = await renderCompare(view, [...new Set(compared[1].split(","))].filter(Boolean).slice(0, MAX_COMPARED));
    else {
      await renderList(view);
      updateCompareButton();
    }
    view.dataset.ready = "true";
  } catch (err) {
    showError(view, err);
  }
  // A finished job no longer changes: stop polling its page.
  if (!done && state.key) state.timer = setTimeout(refresh, POLL_MS);
}

function askForKey(message, offered) {
  const dialog = document.getElementById("key-dialog");
  const error = document.getElementById("key-error");
  const note = document.getElementById("key-note");
  error.hidden = !message;
  error.textContent = message || "";
  note.hidden = !offered;
  note.textContent = offered ? `A link filled in a key starting with ${offered.slice(0, 8)}…: Save to use it.` : "";
  if (offered) document.getElementById("key-input").value = offered;
  if (!dialog.open) dialog.showModal();
}

function useKey(key) {
  state.key = key;
  localStorage.setItem(KEY_STORAGE, key);
  state.metrics.clear(); // what another key's owner may see is not kept
  refresh();
}

// `#key=...` (printed by `qaa up`): the fragment never reaches the server nor its logs. It is wiped from the
// address bar at once (so the key stays neither in the URL nor in the history) and returned, never stored here.
function keyFromFragment() {
  const m = location.hash.match(/^#key=([^&]+)/);
  if (!m) return null;
  history.replaceState(null, "", `${location.pathname}${location.search}`);
  try {
    return decodeURIComponent(m[1]).trim() || null;
  } catch {
    return null; // malformed escapes: nothing to offer
  }
}

// A link can come from anyone: its key replaces nothing until the user says so. Without a key yet, the key
// dialog opens filled in (Save stores it); with another one, the link-key dialog asks (only a prefix is shown).
// Nothing is fetched until it is answered.
function offerLinkKey(linkKey) {
  clearTimeout(state.timer);
  if (!state.key) {
    askForKey(null, linkKey);
    return;
  }
  state.linkKey = linkKey;
  document.getElementById("link-key-prefix").textContent = `${linkKey.slice(0, 8)}…`;
  const dialog = document.getElementById("link-key-dialog");
  dialog.returnValue = "";
  if (!dialog.open) dialog.showModal();
}

function onLinkKeyAnswer() {
  const dialog = document.getElementById("link-key-dialog");
  const linkKey = state.linkKey;
  state.linkKey = null;
  // "Use this key" closes it with "use"; "Keep my key" with "keep", Escape with "": both keep the stored key.
  if (dialog.returnValue === "use" && linkKey) useKey(linkKey);
  else refresh();
}

function onHashChange() {
  const linkKey = keyFromFragment();
  if (linkKey && linkKey !== state.key) offerLinkKey(linkKey);
  else refresh();
}

function init() {
  const linkKey = keyFromFragment();
  document.getElementById("key-form").addEventListener("submit", () => {
    const key = document.getElementById("key-input").value.trim();
    if (key) useKey(key);
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    state.key = null;
    document.getElementById("key-input").value = "";
  });
  document.getElementById("key-button").addEventListener("click", () => askForKey());
  document.getElementById("link-key-dialog").addEventListener("close", onLinkKeyAnswer);
  window.addEventListener("hashchange", onHashChange);
  if (linkKey && linkKey !== state.key) offerLinkKey(linkKey);
  else if (!state.key) askForKey();
  else refresh();
}

init();
