// sae-lens-attn explorer: the page over the JSON API (/api/...). Every number shown comes from the server.
"use strict";

const state = { info: null, analysis: null, text: "", pos: null, colour: {}, selected: null };

function $(sel, root = document) { return root.querySelector(sel); }

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function fmt(v) {
  if (v === null || v === undefined) return "\u2013";
  if (Number.isInteger(v)) return String(v);
  return Number(v).toPrecision(4);
}

function tokText(s) { return s.replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5"); }
// in the prompt's token row a newline also breaks the line, as in the text
function rowText(s) { return s.replace(/\n/g, "\u23ce\n").replace(/\t/g, "\u21e5"); }

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  const data = await r.json();
  if (!r.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
  return data;
}

function status(msg, isError = false) {
  const s = $("#status");
  s.textContent = msg;
  s.className = isError ? "meta error" : "meta";
}

function table(headers, rows, attrs = {}) {
  const t = el("table", attrs);
  t.append(el("tr", {}, ...headers.map((h) => el("th", { text: h }))));
  for (const r of rows) t.append(r);
  return t;
}

function numCell(v, cls = "num") { return el("td", { class: cls, text: fmt(v), "data-value": String(v) }); }

// ColorBrewer RdBu, red for positive and white at zero (as on the dashboard pages; plotly.js's own "RdBu" is grey there)
const DIVERGING = [[0, "rgb(5,48,97)"], [0.1, "rgb(33,102,172)"], [0.2, "rgb(67,147,195)"], [0.3, "rgb(146,197,222)"],
  [0.4, "rgb(209,229,240)"], [0.5, "rgb(247,247,247)"], [0.6, "rgb(253,219,199)"], [0.7, "rgb(244,165,130)"],
  [0.8, "rgb(214,96,77)"], [0.9, "rgb(178,24,43)"], [1, "rgb(103,0,31)"]];

function plot(div, data, layout) {
  if (!window.Plotly) { div.textContent = "(plotly.js did not load)"; return; }
  const base = { margin: { l: 50, r: 10, t: 30, b: 40 }, height: 260, paper_bgcolor: "#fff", plot_bgcolor: "#fff",
    font: { size: 11 }, xaxis: { gridcolor: "#eee" }, yaxis: { gridcolor: "#eee" } };
  Plotly.newPlot(div, data, Object.assign(base, layout), { displaylogo: false, responsive: true });
}

// --- analysis ------------------------------------------------------------------------------------------
async function analyze() {
  const text = $("#prompt").value;
  const topK = Number($("#topk").value) || 8;
  status("analyzing\u2026");
  try {
    const t0 = performance.now();
    const res = await api("/api/analyze", { text, top_k: topK });
    state.analysis = res; state.text = text; state.colour = {}; state.selected = null;
    const firstText = res.tokens.find((t) => !t.structural);
    state.pos = firstText ? firstText.pos : 0;
    renderPanels();
    selectToken(state.pos);
    $("#detail").hidden = true;
    status(`${res.n_tokens} tokens; server ${res.elapsed_ms.toFixed(1)} ms, round trip ${(performance.now() - t0).toFixed(0)} ms`);
  } catch (err) { status(err.message, true); }
}

function saeInfo(id) { return state.info.saes.find((s) => s.id === id); }

function renderPanels() {
  const grid = $("#saes");
  grid.replaceChildren();
  for (const s of state.analysis.saes) {
    const info = saeInfo(s.id);
    const input = el("input", { type: "number", min: "0", max: String(info.d_sae - 1), placeholder: "feature",
      class: "colour-feature" });
    const colourBy = el("div", { class: "colour-by" }, "colour tokens by ",
      el("span", { class: "colour-label", text: "the strongest feature" }), " \u00b7 feature ", input,
      el("button", { type: "button", text: "colour", onclick: () => colourBy_(s.id, input.value) }),
      el("button", { type: "button", text: "strongest", onclick: () => colourBy_(s.id, "") }));
    input.addEventListener("keydown", (ev) => { if (ev.key === "Enter") colourBy_(s.id, input.value); });
    const toks = el("div", { class: "tokens" });
    for (const t of state.analysis.tokens) {
      toks.append(el("span", { class: t.structural ? "tok structural" : "tok", "data-pos": String(t.pos),
        text: rowText(t.text), onclick: () => selectToken(t.pos) }));
    }
    const title = `${info.site} \u00b7 ${info.architecture}${info.k ? " k=" + info.k : ""} \u00b7 ${info.d_sae} features`;
    // the evaluation saved at training, unreliable CE-recovered ratios marked * with their reason
    const evaluation = info.evaluation ? el("pre", { class: "meta evaluation", text: info.evaluation.lines.join("\n") }) : "";
    grid.append(el("div", { class: "sae-panel", "data-sae": s.id }, el("h2", { text: s.id }),
      el("div", { class: "meta", text: title }), evaluation, colourBy, toks, el("div", { class: "features" })));
    colourTokens(s.id);
  }
}

async function colourBy_(saeId, value) {
  try {
    if (value === "" || value === null) { delete state.colour[saeId]; }
    else {
      const feature = Number(value);
      state.colour[saeId] = await api("/api/activations", { text: state.text, sae: saeId, feature });
    }
    colourTokens(saeId);
  } catch (err) { status(err.message, true); }
}

function colourTokens(saeId) {
  const s = state.analysis.saes.find((x) => x.id === saeId);
  const chosen = state.colour[saeId];
  const values = chosen ? chosen.acts : s.max_act;
  const toks = state.analysis.tokens;
  let vmax = 0;
  toks.forEach((t, i) => { if (!t.structural) vmax = Math.max(vmax, values[i]); });
  const panel = $(`.sae-panel[data-sae="${CSS.escape(saeId)}"]`);
  $(".colour-label", panel).textContent = chosen ? `feature ${chosen.feature}` : "the strongest feature";
  panel.querySelectorAll(".tok").forEach((span) => {
    const i = Number(span.dataset.pos);
    const v = toks[i].structural ? 0 : values[i];
    const alpha = vmax > 0 ? Math.max(0, Math.min(1, v / vmax)) : 0;
    span.style.background = `rgba(255,120,0,${alpha.toFixed(3)})`;
    span.dataset.value = String(v);
    const which = chosen ? `feature ${chosen.feature}` : (s.argmax[i] === null ? "no feature" : `feature ${s.argmax[i]}`);
    span.title = toks[i].structural ? "structural token: not an SAE input" : `${which}: ${fmt(v)}`;
  });
}

function selectToken(pos) {
  state.pos = pos;
  document.querySelectorAll(".tok").forEach((s) => s.classList.toggle("sel", Number(s.dataset.pos) === pos));
  for (const s of state.analysis.saes) {
    const panel = $(`.sae-panel[data-sae="${CSS.escape(s.id)}"] .features`);
    const tok = state.analysis.tokens[pos];
    const head = el("h3", { text: `top features at ${pos}: \u201c${tokText(tok.text)}\u201d` });
    if (tok.structural) { panel.replaceChildren(head, el("p", { class: "meta", text: "structural token: the SAEs never read it" })); continue; }
    const rows = s.features[pos].map((f, j) => el("tr", { class: "feat-row", "data-sae": s.id, "data-feature": String(f),
      onclick: () => selectFeature(s.id, f) },
      el("td", { class: "num feature", text: String(f) }), numCell(s.acts[pos][j], "num act"),
      el("td", { class: "head", text: `H${s.heads[pos][j]}` }),
      el("td", { class: "share-head", text: s.share_heads[pos] ? `H${s.share_heads[pos][j]}` : "\u2013" })));
    const note = el("div", { class: "meta", text: `${s.l0[pos]} active \u00b7 error term ${fmt(s.error_fvu[pos])} of ||x||\u00b2` });
    panel.replaceChildren(head, rows.length ? table(["feature", "activation", "top head (DFA)", "top head (decoder)"], rows,
      { class: "top-features" }) : el("p", { class: "meta", text: "no feature fires here" }), note);
  }
}

// --- one feature at one token --------------------------------------------------------------------------
async function selectFeature(saeId, feature) {
  state.selected = { sae: saeId, feature };
  document.querySelectorAll("tr.feat-row").forEach((r) => r.classList.toggle("sel",
    r.dataset.sae === saeId && Number(r.dataset.feature) === feature));
  const box = $("#detail");
  box.hidden = false;
  box.replaceChildren(el("p", { class: "meta", text: "computing\u2026" }));
  try {
    const d = await api("/api/feature", { text: state.text, sae: saeId, feature, pos: state.pos });
    renderDetail(d);
  } catch (err) { box.replaceChildren(el("p", { class: "error", text: err.message })); }
}

function refused(card, what) { card.append(el("p", { class: "meta refused", text: `not shown: ${what.refused}` })); }

function renderDetail(d) {
  const box = $("#detail");
  const title = el("h2", { id: "detail-title", text: `${d.sae} feature ${d.feature} at token ${d.pos} \u201c${tokText(d.token)}\u201d` });
  const links = el("div", { class: "meta" },
    el("button", { type: "button", text: "colour tokens by this feature", onclick: () => colourBy_(d.sae, String(d.feature)) }),
    " ", d.dashboard ? el("a", { href: d.dashboard, target: "_blank", id: "dashboard-link", text: "dashboard page" })
      : el("span", { text: "no dashboard page for this feature" }));
  const summary = table(["quantity", "value"], [
    ["activation", d.act], ["pre-activation", d.pre], ["bias term", d.bias],
    ["sum of DFA by head + bias", d.dfa_by_head.reduce((a, b) => a + b, 0) + d.bias],
    ["SAE error at this token, ||x - x\u0302||\u00b2 / ||x||\u00b2", d.error.fvu],
    ["active features here", d.error.l0]].map(([k, v]) => el("tr", {}, el("td", { text: k }), numCell(v))),
    { id: "detail-summary" });
  const grid = el("div", { class: "detail-grid" });
  const dfaCard = el("div", { class: "card" }, el("h3", { text: `DFA by head (top head H${d.top_head})` }), summary);
  const dfaHead = el("div", { class: "plot", id: "plot-dfa-head" });
  dfaCard.append(dfaHead);
  const srcCard = el("div", { class: "card" }, el("h3", { text: "DFA by head and source position" }));
  const dfaSrc = el("div", { class: "plot", id: "plot-dfa-source" });
  srcCard.append(dfaSrc);
  const qk = el("div", { class: "card", id: "qk" }, el("h3", { text: "Why a head attends there: QK attribution" }),
    el("p", { class: "meta", text: "click a cell of the heatmap (a head and a source) to split that head's attention " +
      "score from this token to that source into query term \u00d7 key term pairs" }));
  grid.append(dfaCard, srcCard, qk, rdfaCard(d), upstreamCard(d), headsLogitsCard(d), steerCard(d));
  box.replaceChildren(title, links, grid);
  const heads = d.dfa_by_head.map((_, h) => `H${h}`);
  plot(dfaHead, [{ type: "bar", x: heads, y: d.dfa_by_head, marker: { color: "#4c78a8" } }],
    { title: { text: "DFA by head" }, height: 220 });
  const labels = d.sources.map((s) => `${s.pos}:${tokText(s.text)}`);
  plot(dfaSrc, [{ type: "heatmap", z: d.dfa_by_source, x: labels, y: heads, colorscale: DIVERGING, zmid: 0,
    hovertemplate: "%{y} from %{x}<br>DFA %{z:.4g}<extra></extra>" }],
  { height: 140 + 22 * heads.length, xaxis: { tickangle: -60, automargin: true, tickfont: { size: 9 } } });
  // a cell is (head, source): show that head's QK attribution from this token to that source
  if (dfaSrc.on) dfaSrc.on("plotly_click", (ev) => {
    const [h, i] = ev.points[0].pointIndex;
    showQK(d, h, d.sources[i].pos);
  });
}

// --- why a head attends there: QK attribution -----------------------------------------------------------
async function showQK(d, head, source) {
  const card = $("#qk");
  card.replaceChildren(el("h3", { text: `Why L${d.layer}H${head} attends from ${d.pos} to ${source}` }),
    el("p", { class: "meta", text: "computing\u2026" }));
  try {
    const r = await api("/api/qk", { text: state.text, layer: d.layer, head, pos: d.pos, source });
    renderQK(card, r);
  } catch (err) { card.append(el("p", { class: "error", text: err.message })); }
}

function termRows(rows, link = false) {
  return rows.map((r) => el("tr", {}, el("td", {}, link && r.dashboard ? el("a", { href: r.dashboard, target: "_blank",
    text: r.name }) : r.name), numCell(r.value)));
}

function pairTable(pairs, id) {
  return table(["query term", "key term", "score part"], pairs.map((p) => el("tr", {}, el("td", { text: p.query }),
    el("td", { text: p.key }), numCell(p.value))), id ? { id } : {});
}

function sidesTables(a, link = false) {
  return el("div", { class: "sides" }, table(["query side", "total"], termRows(a.query_totals.slice(0, 8), link)),
    table(["key side", "total"], termRows(a.key_totals.slice(0, 8), link)));
}

function renderQK(card, r) {
  const title = `Why L${r.layer}H${r.head} attends from ${r.query_pos} \u201c${tokText(r.query_token || "")}\u201d to ` +
    `${r.key_pos} \u201c${tokText(r.key_token || "")}\u201d`;
  card.replaceChildren(el("h3", { id: "qk-title", text: title }));
  if (r.refused) { refused(card, r); return; }
  const sum = table(["quantity", "value"], [
    ["attention probability", r.pattern[0]], ["score (sum of the parts)", r.score],
    ["the model's own score", r.model_score], ["|parts - model|", r.sum_error]].map(([k, v]) =>
    el("tr", {}, el("td", { text: k }), numCell(v))), { id: "qk-summary" });
  card.append(sum, el("div", { class: "meta", text: [r.check, ...r.notes].join("; ") }),
    el("h3", { text: "Largest query term \u00d7 key term pairs" }), pairTable(r.pairs, "qk-pairs"), sidesTables(r));
  if (r.contrast) {
    const c = r.contrast;
    card.append(el("h3", { text: `Contrast: rather than ${c.contrast_pos} \u201c${tokText(c.token)}\u201d (attention ` +
      `${fmt(c.pattern[1])})` }), el("div", { class: "meta", id: "qk-contrast", "data-value": String(c.score),
      text: `score(${r.key_pos}) - score(${c.contrast_pos}) = ${fmt(c.score)}` }), pairTable(c.pairs.slice(0, 6)), sidesTables(c));
  }
  for (const f of r.features) {
    card.append(el("h3", { text: `Through ${f.sae}: features on both sides` }), pairTable(f.pairs.slice(0, 8)),
      sidesTables(f, true));
  }
  if (!r.features.length) card.append(el("p", { class: "meta", text: "load an SAE at an earlier layer (--sae) to see its features here" }));
}

function rdfaCard(d) {
  const card = el("div", { class: "card", id: "rdfa" }, el("h3", { text: "One RDFA step back: upstream components" }));
  if (d.rdfa.refused) { refused(card, d.rdfa); return card; }
  const total = d.rdfa.total;
  const rows = d.rdfa.components.slice(0, 12).map((c) => el("tr", {}, el("td", { text: c.name }), numCell(c.value),
    el("td", { class: "num", text: total ? `${(100 * c.value / total).toFixed(1)}%` : "\u2013" })));
  rows.push(el("tr", {}, el("td", { text: "norm bias + b_V" }), numCell(d.rdfa.value_bias), el("td")));
  card.append(table(["component", "DFA", "share"], rows), el("div", { class: "meta",
    text: `components + bias = ${fmt(total)} (the DFA by head, summed)` }));
  return card;
}

function upstreamCard(d) {
  const card = el("div", { class: "card", id: "upstream" }, el("h3", { text: `Along H${d.top_head}: upstream heads` }));
  if (d.upstream_heads.refused) refused(card, d.upstream_heads);
  else {
    card.append(table(["upstream head", "DFA"], d.upstream_heads.heads.slice(0, 8).map((h) =>
      el("tr", {}, el("td", { text: `L${h.layer}H${h.head}` }), numCell(h.value)))));
  }
  for (const u of d.upstream_features) {
    card.append(el("h3", { text: `Upstream features of ${u.sae}` }));
    if (u.refused) { refused(card, u); continue; }
    const rows = u.features.slice(0, 10).map((f) => el("tr", {}, el("td", {},
      f.dashboard ? el("a", { href: f.dashboard, target: "_blank", text: String(f.feature) }) : String(f.feature)), numCell(f.value)));
    rows.push(el("tr", { class: "error-row" }, el("td", { text: "error term" }), numCell(u.error)));
    rows.push(el("tr", {}, el("td", { text: "decoder bias (+ b_O)" }), numCell(u.bias)));
    card.append(table(["feature", "DFA"], rows), el("div", { class: "meta", text:
      `layer total ${fmt(u.total)}; error term ${u.error_share === null ? "\u2013" : (100 * u.error_share).toFixed(1) + "%"} of it` }));
  }
  if (!d.upstream_features.length) card.append(el("p", { class: "meta", text: "load an SAE at an earlier layer (--sae) to split upstream attention into its features" }));
  return card;
}

function headsLogitsCard(d) {
  const card = el("div", { class: "card", id: "logits" });
  if (d.head_shares) {
    card.append(el("h3", { text: "Decoder-norm share per head" }), table(d.head_shares.map((_, h) => `H${h}`),
      [el("tr", {}, ...d.head_shares.map((v) => numCell(v)))], { id: "head-shares" }));
  }
  card.append(el("h3", { text: "Direct logit effect" }));
  if (d.logits.refused) { refused(card, d.logits); return card; }
  const n = Math.max(d.logits.top.length, d.logits.bottom.length);
  const rows = [];
  for (let i = 0; i < n; i++) {
    const t = d.logits.top[i], b = d.logits.bottom[i];
    rows.push(el("tr", {}, el("td", { text: JSON.stringify(t.text) }), numCell(t.value),
      el("td", { text: JSON.stringify(b.text) }), numCell(b.value)));
  }
  card.append(table(["top token", "logit", "bottom token", "logit"], rows));
  return card;
}

function steerCard(d) {
  const card = el("div", { class: "card", id: "steer" }, el("h3", { text: "Steering: add the feature at every token" }));
  if (state.info.kind === "encoder") { card.append(el("p", { class: "meta", text: "encoders have no next token to steer" })); return card; }
  const coef = el("input", { type: "number", id: "steer-coef", step: "any", value: String(Math.max(1, Math.round(4 * Math.abs(d.act) || 10))) });
  const n = el("input", { type: "number", id: "steer-n", min: "0", max: "64", value: "20" });
  const out = el("div", { id: "steer-out" });
  const go = el("button", { type: "button", id: "steer-go", text: "steer", onclick: async () => {
    out.replaceChildren(el("p", { class: "meta", text: "generating\u2026" }));
    try {
      const r = await api("/api/steer", { text: state.text, sae: d.sae, feature: d.feature, coefficient: Number(coef.value), n_tokens: Number(n.value) });
      renderSteer(out, r);
    } catch (err) { out.replaceChildren(el("p", { class: "error", text: err.message })); }
  } });
  card.append(el("div", {}, "coefficient ", coef, " new tokens ", n, " ", go), out);
  return card;
}

function renderSteer(out, r) {
  const rows = r.clean.map((c, i) => el("tr", {}, el("td", { text: JSON.stringify(c.text) }), numCell(c.prob),
    el("td", { text: JSON.stringify(r.steered[i].text) }), numCell(r.steered[i].prob)));
  const ch = (list) => list.slice(0, 5).map((c) => el("tr", {}, el("td", { text: JSON.stringify(c.text) }), numCell(c.clean), numCell(c.steered), numCell(c.delta)));
  out.replaceChildren(
    el("div", { class: "meta", text: `KL(clean || steered) of the next token ${fmt(r.kl)}; ||vector|| ${fmt(r.vector_norm)}` }),
    table(["clean next token", "p", "steered next token", "p"], rows, { id: "steer-top" }),
    table(["most increased", "clean p", "steered p", "change"], ch(r.increased)),
    table(["most decreased", "clean p", "steered p", "change"], ch(r.decreased)),
    el("h3", { text: "greedy continuation" }), el("div", { class: "meta", text: "clean" }),
    el("div", { class: "cont", id: "cont-clean", text: r.continuation.clean }),
    el("div", { class: "meta", text: "steered" }), el("div", { class: "cont", id: "cont-steered", text: r.continuation.steered }));
}

// --- registered analyses (explorer=True) on the prompt ----------------------------------------------------
function analysesCard() {
  const box = $("#analyses");
  const list = state.info.analyses || [];
  if (!list.length) return;
  const pick = el("select", { id: "analysis-name" }, ...list.map((a) => el("option", { value: a.name, text: a.name })));
  const sae = el("select", { id: "analysis-sae" }, ...state.info.saes.map((s) => el("option", { value: s.id, text: s.id })));
  const opts = el("span", { id: "analysis-options" });
  const help = el("div", { class: "meta" });
  const out = el("div", { id: "analysis-out" });
  const showOptions = () => {
    const a = list.find((x) => x.name === pick.value);
    help.textContent = a.help;
    opts.replaceChildren(...a.options.map((o) => el("label", { title: o.help }, ` ${o.flag} `,
      el("input", { "data-option": o.name, "data-type": o.type, value: o.default === null ? "" : String(o.default) }))));
  };
  pick.addEventListener("change", showOptions);
  const go = el("button", { type: "button", id: "analysis-run", text: "run", onclick: () => runAnalysis(pick.value, sae.value, opts, out) });
  box.append(el("h2", { text: "Analyses on this prompt" }), el("div", { class: "controls" }, pick, " with ", sae, opts, go), help, out);
  showOptions();
  box.hidden = false;
}

async function runAnalysis(name, saeId, opts, out) {
  const options = {};
  opts.querySelectorAll("input").forEach((i) => {
    if (i.value === "") return;
    options[i.dataset.option] = i.dataset.type === "int" || i.dataset.type === "float" ? Number(i.value) : i.value;
  });
  out.replaceChildren(el("p", { class: "meta", text: "running\u2026" }));
  try {
    const r = await api("/api/run", { text: $("#prompt").value, sae: saeId, analysis: name, options });
    out.replaceChildren(...r.parts.map((p) => el("pre", { class: "cont analysis-part", text: p.text })),
      el("div", { class: "meta", text: `${r.analysis} on ${r.sae} in ${fmt(r.elapsed_ms / 1000)} s` }));
  } catch (err) { out.replaceChildren(el("p", { class: "error", text: err.message })); }
}

async function start() {
  try {
    state.info = await api("/api/info");
    const saes = state.info.saes.map((s) => s.id).join(", ");
    $("#model-info").textContent = `${state.info.model} (${state.info.family}, ${state.info.kind}) \u00b7 ` +
      `tokens: ${state.info.token_policy} \u00b7 SAEs: ${saes}`;
    $("#analyze").addEventListener("click", analyze);
    analysesCard();
    $("#prompt").addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) analyze(); });
    document.body.dataset.ready = "1";
  } catch (err) { status(err.message, true); }
}

document.addEventListener("DOMContentLoaded", start);
