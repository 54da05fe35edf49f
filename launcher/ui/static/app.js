// kubetune ui: the Configure view. Every widget comes from /api/forms (generated from the
// pydantic schema); this file knows widget kinds, never config fields.
"use strict";

const CSRF = document.querySelector('meta[name="kubetune-csrf"]').content;
const state = { tabs: [], current: null, yaml: "", run: "", overwrite: null };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v === null || v === undefined) continue;
    node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// "1 file" / "2 files": as kubetune.humanize.count words it for the CLI.
function count(n, noun, pluralForm) {
  if (n === 1) return `${n} ${noun}`;
  if (pluralForm) return `${n} ${pluralForm}`;
  if (/(epoch|stomach|monarch)$/.test(noun)) return `${n} ${noun}s`; // a hard ch, as humanize.py
  if (/(s|x|z|ch|sh)$/.test(noun)) return `${n} ${noun}es`;
  if (/[^aeiou]y$/.test(noun)) return `${n} ${noun.slice(0, -1)}ies`;
  return `${n} ${noun}s`;
}

async function api(path, data) {
  const init = data === undefined ? {} : {
    method: "POST", body: JSON.stringify(data),
    headers: { "Content-Type": "application/json", "X-Kubetune-CSRF": CSRF },
  };
  let response;
  try { response = await fetch(path, init); } catch (err) { return { error: `the UI server is unreachable (${err.message})` }; }
  const text = await response.text();
  try { return JSON.parse(text); } catch (err) { return { error: text.split("\n")[0] || `HTTP ${response.status}` }; }
}

function say(id, text, kind) {
  const node = document.getElementById(id);
  node.textContent = text || "";
  node.className = `msg ${kind || ""}`;
}

// --- widgets ---------------------------------------------------------------------------------

function bounds(w) {
  const b = w.bounds, out = [];
  if ("minimum" in b) out.push(`≥ ${b.minimum}`);
  if ("exclusiveMinimum" in b) out.push(`> ${b.exclusiveMinimum}`);
  if ("maximum" in b) out.push(`≤ ${b.maximum}`);
  if ("exclusiveMaximum" in b) out.push(`< ${b.exclusiveMaximum}`);
  return out.join(", ");
}

function control(w, id) {
  switch (w.kind) {
    case "bool": case "optional": return el("input", { id, type: "checkbox" });
    case "int": case "number": return el("input", {
      id, type: "number", step: w.kind === "int" ? "1" : "any",
      min: w.bounds.minimum, max: w.bounds.maximum, placeholder: w.nullable ? "(none)" : null });
    case "enum": case "union": {
      const select = el("select", { id });
      if (w.nullable) select.append(el("option", { value: "" }, "(none)"));
      w.choices.forEach((c, i) => select.append(el("option", { value: String(i) }, String(c))));
      return select;
    }
    case "lines": return el("textarea", { id, rows: 3, placeholder: "one per line" });
    case "json": return el("textarea", { id, rows: 2, placeholder: "JSON" });
    case "group": case "const": return el("span", { id });
    default: return el("input", { id, type: "text", placeholder: w.nullable ? "(none)" : null });
  }
}

function helpText(w) {
  const parts = [w.help];
  const range = bounds(w);
  if (range) parts.push(`range: ${range}`);
  if (w.required) parts.push("required");
  else if (!["group", "optional", "const"].includes(w.kind)) parts.push(`default: ${JSON.stringify(w.default)}`);
  return parts.filter(Boolean).join("\n");
}

function renderWidget(tab, w) {
  const id = `f-${tab.type}-${w.id}`;
  const input = control(w, id);
  const row = el("div", { class: `field ${w.kind}`, "data-path": w.path, "data-id": w.id, "data-kind": w.kind },
    el("label", { for: id, title: w.path }, w.label), input,
    el("div", { class: "help" }, helpText(w)), el("div", { class: "err" }));
  row.style.marginLeft = `${w.depth * 1.2}em`;
  if (w.kind === "const") row.hidden = true;
  w.node = input;
  w.row = row;
  if (w.kind === "union" || w.kind === "optional") input.addEventListener("change", () => updateVisibility(tab));
  return row;
}

function renderTab(tab) {
  const root = el("div", { class: "tab", "data-type": tab.type });
  const sections = {};
  for (const name of tab.sections) {
    const sec = el("section", { class: "section", "data-section": name }, el("h2", {}, name));
    sections[name] = { sec, adv: null };
    root.append(sec);
  }
  tab.byId = {};
  for (const w of tab.widgets) {
    const s = sections[w.section];
    if (w.advanced && !s.adv) {
      s.adv = el("details", { class: "advanced" }, el("summary", {}, "Advanced"));
      s.sec.append(s.adv);
    }
    (w.advanced ? s.adv : s.sec).append(renderWidget(tab, w));
    tab.byId[w.id] = w;
  }
  tab.root = root;
  return root;
}

function getValue(w) {
  const n = w.node;
  switch (w.kind) {
    case "bool": case "optional": return n.checked;
    case "const": return w.default;
    case "int": case "number": {
      const raw = n.value.trim();
      if (raw === "") return w.nullable ? null : undefined;
      return Number.isNaN(Number(raw)) ? raw : Number(raw);
    }
    case "enum": case "union": return n.value === "" ? null : w.choices[Number(n.value)];
    case "lines": {
      const items = n.value.split("\n").filter((line) => line.trim() !== "");
      return items.length === 0 && w.nullable ? null : items;
    }
    case "json": {
      const raw = n.value.trim();
      if (raw === "") return w.nullable ? null : undefined;
      try { return JSON.parse(raw); } catch (err) { return raw; }
    }
    default: {
      if (n.value === "") return w.nullable ? null : w.required ? undefined : "";
      return n.value;
    }
  }
}

function setValue(w, v) {
  const n = w.node;
  switch (w.kind) {
    case "bool": case "optional": n.checked = Boolean(v); break;
    case "group": case "const": break;
    case "enum": case "union": {
      const i = w.choices.findIndex((c) => JSON.stringify(c) === JSON.stringify(v));
      n.value = i >= 0 ? String(i) : (w.nullable ? "" : "0");
      break;
    }
    case "lines": n.value = (v || []).join("\n"); break;
    case "json": n.value = v === null || v === undefined ? "" : JSON.stringify(v); break;
    default: n.value = v === null || v === undefined ? "" : String(v);
  }
}

function lookup(values, path) {
  let node = values;
  for (const part of path.split(".")) {
    if (node === null || typeof node !== "object" || !(part in node)) return { found: false };
    node = node[part];
  }
  return { found: true, value: node };
}

function assign(values, path, value) {
  const parts = path.split(".");
  let node = values;
  for (const part of parts.slice(0, -1)) {
    if (node[part] === null || typeof node[part] !== "object") node[part] = {};
    node = node[part];
  }
  node[parts[parts.length - 1]] = value;
}

function shown(tab, w) {
  if (!w.parent) return true;
  const ctrl = tab.byId[w.parent[0]];
  return shown(tab, ctrl) && getValue(ctrl) === w.parent[1];
}

function updateVisibility(tab) {
  for (const w of tab.widgets) if (w.kind !== "const") w.row.hidden = !shown(tab, w);
}

function fill(tab, values) {
  for (const w of tab.widgets) {
    const got = lookup(values, w.path);
    if (w.kind === "optional") setValue(w, got.found ? got.value !== null : w.default);
    else setValue(w, got.found ? got.value : w.default);
  }
  updateVisibility(tab);
}

function collect(tab) {
  const values = {};
  for (const w of tab.widgets) {
    if (w.kind === "group" || !shown(tab, w)) continue;
    const v = getValue(w);
    if (w.kind === "optional") { assign(values, w.path, v ? {} : null); continue; }
    if (v !== undefined) assign(values, w.path, v);
  }
  return values;
}

// --- tabs, problems, actions ---------------------------------------------------------------

function showTab(type) {
  for (const tab of state.tabs) {
    const on = tab.type === type;
    tab.root.hidden = !on;
    tab.button.classList.toggle("active", on);
    tab.button.setAttribute("aria-selected", String(on));
    if (on) state.current = tab;
  }
}

function widgetFor(tab, path) {
  const visible = tab.widgets.filter((w) => w.kind !== "const" && shown(tab, w));
  const exact = visible.find((w) => w.path === path);
  if (exact) return exact;
  const inside = visible.find((w) => w.path.startsWith(`${path}.`));
  if (inside) return inside;
  const cut = path.lastIndexOf(".");
  return cut > 0 ? widgetFor(tab, path.slice(0, cut)) : null;
}

function showProblems(problems) {
  const tab = state.current;
  const list = document.getElementById("problems");
  list.replaceChildren(...problems.map((p) => el("li", {}, p.text)));
  for (const w of tab.widgets) { w.row.classList.remove("invalid", "warned"); w.row.querySelector(".err").textContent = ""; }
  for (const p of problems) {
    const w = p.path ? widgetFor(tab, p.path) : null;
    if (!w) continue;
    w.row.classList.add("invalid");
    const err = w.row.querySelector(".err");
    err.textContent = [err.textContent, p.path === w.path ? p.message : p.text].filter(Boolean).join("; ");
    if (w.advanced) w.row.closest("details").open = true;
  }
}

function showWarnings(warnings) {  // validate's data-path errors: at their fields, in amber
  for (const p of warnings) {
    const w = p.path ? widgetFor(state.current, p.path) : null;
    if (!w) continue;
    w.row.classList.add("warned");
    const err = w.row.querySelector(".err");
    err.textContent = [err.textContent, `warning: ${p.path === w.path ? p.message : p.text}`].filter(Boolean).join("; ");
    if (w.advanced) w.row.closest("details").open = true;
  }
}

async function generate() {
  const result = await api("/api/generate", { values: collect(state.current) });
  state.yaml = result.yaml || "";
  state.run = result.run || "config";
  document.getElementById("yaml").textContent = state.yaml;
  if (result.error) { say("gen-msg", result.error, "error"); return result; }
  showProblems(result.problems || []);
  showWarnings(result.data_warnings || []);
  const warnings = (result.warnings || []).map((w) => `warning: ${w}`).join("\n");
  if (result.valid) say("gen-msg", [`ok: ${result.summary}`, warnings].filter(Boolean).join("\n"), "ok");
  else say("gen-msg", `${count(result.problems.length, "problem")}: see the list above and the marked fields`, "error");
  return result;
}

async function reloadReference() {
  const file = document.getElementById("ref-file").files[0];
  const path = document.getElementById("ref-path").value;
  const request = file ? { text: await file.text(), name: file.name } : { path };
  const result = await api("/api/reference", request);
  say("ref-unknown", "");
  if (result.error) { say("ref-msg", result.error, "error"); return; }
  showTab(result.type);
  fill(state.current, result.values);
  say("ref-msg", `loaded ${file ? file.name : path} into ${result.type}`, "ok");
  if (result.unknown.length) say("ref-unknown", `not in the schema, not loaded: ${result.unknown.join(", ")}`, "warn");
  showProblems(result.problems);
}

async function save() {
  if (!state.yaml) await generate();
  const path = document.getElementById("save-path").value;
  const overwrite = state.overwrite === path; // a second Save onto a file that exists
  const result = await api("/api/save", { path, text: state.yaml, overwrite });
  state.overwrite = result.exists ? path : null;
  if (result.exists) say("save-msg", `${result.exists} already exists: Save again to replace it`, "warn");
  else say("save-msg", result.error || `saved ${result.saved}`, result.error ? "error" : "ok");
}

function download() {
  if (!state.yaml) { say("save-msg", "Generate Config first", "error"); return; }
  const link = el("a", { href: URL.createObjectURL(new Blob([state.yaml], { type: "application/x-yaml" })),
    download: `${state.run}.yaml` });
  document.body.append(link);
  link.click();
  link.remove();
}

async function startTraining() {
  say("start-msg", "submitting…");
  const result = await api("/api/submit", {
    values: collect(state.current),
    target: document.getElementById("target").value,
    sweeps: document.getElementById("sweeps").value.split("\n"),
    replace: document.getElementById("replace").checked,
  });
  if (result.problems) showProblems(result.problems);
  if (result.error) { say("start-msg", result.error, "error"); return; }
  if (!result.submitted) { say("start-msg", "fix the problems listed above first", "error"); return; }
  const lines = result.submitted.map((s) => `${s.run}: ${s.created === false ? "already submitted (same config)" : "submitted"} (${s.backend})`);
  say("start-msg", lines.join("\n"), "ok");
  const first = result.submitted[0];
  const link = el("a", { href: `#run/${first.backend}/${first.run}`, id: "start-link" }, ` open ${first.run}`);
  document.getElementById("start-msg").append(link);
}

async function init() {
  const data = await api("/api/forms");
  if (data.error) { say("gen-msg", data.error, "error"); return; }
  state.tabs = data.tabs;
  const bar = document.getElementById("tabs"), form = document.getElementById("form");
  for (const tab of state.tabs) {
    tab.button = el("button", { type: "button", role: "tab", "data-type": tab.type }, tab.type);
    tab.button.addEventListener("click", () => showTab(tab.type));
    bar.append(tab.button);
    form.append(renderTab(tab));
    fill(tab, tab.starter || {});  // the `launcher init` starter, as invoke-training's tabs open
  }
  showTab(state.tabs[0].type);
  document.getElementById("generate").addEventListener("click", generate);
  document.getElementById("ref-reload").addEventListener("click", reloadReference);
  document.getElementById("save").addEventListener("click", save);
  document.getElementById("download").addEventListener("click", download);
  document.getElementById("start").addEventListener("click", startTraining);
  window.kubetune.readyAt = performance.now();
  document.body.dataset.ready = "true";
}

window.kubetune = { state, api, el, say, collect, count };
document.addEventListener("DOMContentLoaded", init);
