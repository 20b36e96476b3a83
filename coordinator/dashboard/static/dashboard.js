// The umm coordinator dashboard: reads the JSON API only and writes every value with textContent
// (via el()), never as markup, so names and reasons from contributors stay plain text.
"use strict";

const POLL_MS = 3000;
const COLOURS = ["#111827", "#e8590c", "#2b8a3e", "#1c7ed6", "#ae3ec9"];
const SVG = "http://www.w3.org/2000/svg";
let selectedRound = null;  // null: follow the latest round

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") node.addEventListener("click", v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function fill(id, ...children) {
  document.getElementById(id).replaceChildren(...children.filter((c) => c !== null && c !== undefined));
}

const num = (v, d = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
const ci = (lo, hi) => (lo === null || lo === undefined ? "" : `[${num(lo)}, ${num(hi)}]`);
const when = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "–");
const badge = (prefix, value) => el("span", { class: `badge ${prefix}-${value}` }, value.replace(/_/g, " "));
const model = (m) => (m ? el("span", {}, m.name ? `${m.name} ` : "", el("span", { class: "hash muted" }, m.short_hash)) : "–");

function table(headers, rows, opts = {}) {
  if (!rows.length) return el("p", { class: "muted" }, opts.empty || "none");
  const head = el("tr", {}, ...headers.map((h) => el("th", { class: h.num ? "num" : "" }, h.label || h)));
  const body = rows.map((r) => {
    const tr = el("tr", r.attrs || {}, ...r.cells.map((c, i) => el("td", { class: headers[i].num ? "num" : "" }, c)));
    return tr;
  });
  return el("table", { class: opts.cls || "" }, el("thead", {}, head), el("tbody", {}, ...body));
}

async function getJson(path) {
  const r = await fetch(path, { cache: "no-store" });
  const body = await r.json();
  if (!r.ok) throw new Error(`${path}: ${body.error || r.status}`);
  return body;
}

function renderIdentity(id) {
  document.getElementById("network").textContent = id.network;
  fill("identity",
    el("div", {}, "coordinator public key: ", el("code", {}, id.public_key)),
    el("div", { class: "muted small" }, `checkpoint service ${id.checkpoint_address} · status service ${id.status_address} · umm ${id.version}`));
}

function leaderRows(rows, withRank) {
  return rows.map((r) => ({
    attrs: { class: "leader-row" },
    cells: [
      ...(withRank ? [String(r.rank)] : [r.domain]),
      r.model.name, el("span", { class: "hash" }, r.model.short_hash),
      ...(withRank ? [num(r.score), ci(r.ci_low, r.ci_high)] : []),
      badge("verdict", r.verdict), r.reason, el("span", { class: "hash muted" }, r.owner),
    ],
  }));
}

function renderLeaderboard(lb) {
  fill("merged", lb.merged
    ? el("div", {}, "published merged model: ", model(lb.merged.model),
        ` · round ${lb.merged.round} (${lb.merged.method}) · test objective ${num(lb.merged.objective)}`)
    : el("div", { class: "muted" }, "no merged model published yet"));
  const boards = lb.domains.map((d) => el("div", {},
    el("h3", {}, d.domain),
    table([{ label: "rank", num: true }, "name", "hash", { label: "score", num: true }, "95% CI", "verdict", "reason", "contributor"],
      leaderRows(d.rows, true))));
  fill("leaderboard", ...(boards.length ? boards : [el("p", { class: "muted" }, "no ranks yet")]));
  fill("unranked", table(["domains", "name", "hash", "verdict", "reason", "contributor"], leaderRows(lb.unranked, false),
    { empty: "every announced expert is ranked" }));
}

function renderRounds(rounds) {
  const current = selectedRound ?? (rounds.length ? rounds[0].number : null);
  fill("rounds", table(["round", "state", "stage", "method", "merged", { label: "objective", num: true }, "reason"],
    rounds.map((r) => ({
      attrs: { class: `selectable round-row${r.number === current ? " selected" : ""}`,
               onclick: () => { selectedRound = r.number; refresh(); } },
      cells: [String(r.number), badge("state", r.state), r.stage, r.method || "–", model(r.merged), num(r.objective), r.reason],
    })), { empty: "no round yet" }));
  return current;
}

function renderRound(d) {
  const r = d.round;
  document.getElementById("round-title").textContent = `Round ${r.number}`;
  fill("round-state", el("div", {}, badge("state", r.state), ` stage: ${r.stage} · started ${when(r.started_at)}`,
    r.finished_at ? ` · finished ${when(r.finished_at)}` : ""));
  if (!d.plan) fill("plan", el("p", { class: "muted" }, "not planned yet"));
  else fill("plan",
    el("div", {}, `kind: ${d.plan.kind}`, d.plan.pivot ? " · pivot " : "", d.plan.pivot ? model(d.plan.pivot) : null,
      d.plan.reason ? ` · ${d.plan.reason}` : ""),
    table(["stage", "models", "detail"], d.plan.stages.map((s) => ({
      cells: [s.name, el("span", {}, ...s.models.flatMap((m, i) => [i ? ", " : "", model(m)])), s.detail],
    })), { empty: "no stage" }));
  if (!d.decision) fill("decision", el("p", { class: "muted" }, "the round is still running"));
  else fill("decision",
    el("p", { id: "decision-text" }, badge("state", d.decision.published ? "published" : d.decision.state), " ", d.decision.text),
    table(["figure", { label: "value", num: true }, "95% CI"],
      d.decision.figures.map((f) => ({ cells: [f.name, num(f.value, 4), ci(f.ci_low, f.ci_high)] })), { empty: "no figures" }));
  if (!d.comparison) fill("comparison", el("p", { class: "muted" }, "not evaluated yet"));
  else fill("comparison", table(["model", "", ...d.comparison.tasks.map((t) => ({ label: t, num: true })), { label: "objective", num: true }],
    d.comparison.models.map((m) => ({
      attrs: { class: `comparison-${m.role}` },
      cells: [m.role, model(m.model), ...d.comparison.tasks.map((t) => num(m.scores[t])), num(m.objective)],
    }))));
  fill("jobs", table(["job", "kind", "status", { label: "progress", num: true }, "message"],
    d.jobs.map((j) => ({ cells: [String(j.id), j.kind, j.status + (j.failure ? ` (${j.failure})` : ""),
      `${Math.round(j.progress * 100)}%`, j.message] })), { empty: "no job" }));
}

function chart(curve, empty) {
  if (!curve) return [el("p", { class: "muted" }, empty)];
  const W = 460, H = 220, L = 52, R = 10, T = 10, B = 34;
  const pts = curve.series.flatMap((s) => s.points);
  if (!pts.length) return [el("h3", {}, curve.title), el("p", { class: "muted" }, "no data yet")];
  let [x0, x1] = [Math.min(...pts.map((p) => p.x)), Math.max(...pts.map((p) => p.x))];
  let [y0, y1] = [Math.min(...pts.map((p) => p.y)), Math.max(...pts.map((p) => p.y))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  root.appendChild(svg("title", {}, curve.title));
  root.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" }));
  root.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" }));
  for (const [y, label] of [[y0, num(y0)], [y1, num(y1)]]) {
    root.appendChild(svg("text", { x: L - 4, y: sy(y) + 4, "text-anchor": "end", "font-size": 11 }, label));
  }
  for (const [x, label] of [[x0, String(x0)], [x1, String(x1)]]) {
    root.appendChild(svg("text", { x: sx(x), y: H - B + 14, "text-anchor": "middle", "font-size": 11 }, label));
  }
  root.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", "font-size": 11, fill: "#666" }, curve.x_label));
  curve.series.forEach((s, i) => {
    if (!s.points.length) return;
    const colour = COLOURS[i % COLOURS.length];
    root.appendChild(svg("polyline", { points: s.points.map((p) => `${sx(p.x)},${sy(p.y)}`).join(" "), fill: "none",
      stroke: colour, "stroke-width": i === 0 ? 2.2 : 1.3 }));
    for (const p of s.points) root.appendChild(svg("circle", { cx: sx(p.x), cy: sy(p.y), r: 2.2, fill: colour }));
  });
  const legend = el("div", { class: "legend" }, ...curve.series.map((s, i) => {
    const swatch = el("i", {});
    swatch.style.background = COLOURS[i % COLOURS.length];
    return el("span", {}, swatch, s.name);
  }));
  return [el("h3", {}, curve.title), el("div", { class: "muted small" },
    `${curve.y_label} · job ${curve.job.id} ${curve.job.status}`), root, legend];
}

function renderCurves(c) {
  fill("curve-evolve", ...chart(c && c.evolve, "no CMA-ES search in this round"));
  fill("curve-fusion", ...chart(c && c.fusion, "no fusion training in this round"));
}

function renderNodes(n) {
  document.getElementById("nodes-merged").textContent = n.merged ? `(${n.merged.short_hash})` : "";
  fill("providers",
    n.providers_error ? el("p", { class: "muted" }, n.providers_error) : null,
    table(["name", "address", "contributor"], n.providers.map((p) => ({ attrs: { class: "provider-row" },
      cells: [p.name, p.address, el("span", { class: "hash muted" }, p.owner)] })), { empty: "no provider known" }));
  fill("experts", table(["name", "domains", "model", "address", "last seen"], n.experts.map((e) => ({
    attrs: { class: "node-row" },
    cells: [e.name, e.domains.join(", "), el("span", { class: "hash" }, e.model ? e.model.short_hash : ""), e.address, when(e.last_seen)],
  })), { empty: "no expert announced yet" }));
}

async function refresh() {
  const status = document.getElementById("refreshed");
  try {
    const [id, lb, rounds, nodes] = await Promise.all(
      ["/api/identity", "/api/leaderboard", "/api/rounds?limit=50", "/api/nodes"].map(getJson));
    renderIdentity(id);
    renderLeaderboard(lb);
    const current = renderRounds(rounds.rounds);
    renderNodes(nodes);
    if (current !== null) {
      const [detail, curves] = await Promise.all([getJson(`/api/rounds/${current}`), getJson(`/api/curves/${current}`)]);
      renderRound(detail);
      renderCurves(curves);
    } else {
      renderCurves(null);
    }
    status.className = "muted";
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    status.className = "error";
    status.textContent = `cannot read the coordinator: ${e.message}`;
  }
}

refresh();
setInterval(refresh, POLL_MS);
