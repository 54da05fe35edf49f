// kubetune ui: the Runs views (the table, one run's page) and the dataset preview. Polls
// the JSON API every POLL_MS while a view is open; every failure is one line in place.
"use strict";

const POLL_MS = 2000;
let timer = null;

function fmt(v, digits) {
  if (v === null || v === undefined) return "–";
  return typeof v === "number" ? Number(v.toPrecision(digits || 4)).toString() : String(v);
}

function route() {
  clearTimeout(timer);
  const hash = location.hash.slice(1) || "configure";
  const [view, backend, ...rest] = hash.split("/");
  for (const name of ["configure", "runs", "run", "sweep"]) document.getElementById(`view-${name}`).hidden = name !== view;
  if (view === "runs") pollRuns();
  if (view === "sweep") pollSweep(backend, decodeURIComponent(rest.join("/")));
  if (view === "run") pollRun(backend, decodeURIComponent(rest.join("/")));
}

function runRow(r) {
  const k = window.kubetune;
  const step = r.step === null ? "–" : `${r.step}/${r.total || "?"}`;
  const reason = r.reason || r.progress_error || "";
  return k.el("tr", { "data-run": r.run, "data-phase": r.phase },
    k.el("td", {}, k.el("a", { href: `#run/${r.backend}/${encodeURIComponent(r.run)}` }, r.run)),
    k.el("td", {}, r.backend), k.el("td", { class: `phase-${r.phase}` }, r.phase), k.el("td", {}, step),
    k.el("td", {}, fmt(r.loss)), k.el("td", {}, fmt(r.images_per_second, 3)), k.el("td", {}, r.eta || "–"),
    k.el("td", {}, reason));
}

function runsTable(runs) {
  const k = window.kubetune;
  const rows = [], sweeps = new Map();
  for (const r of runs) {
    if (!r.sweep) { rows.push(runRow(r)); continue; }
    if (!sweeps.has(r.sweep)) sweeps.set(r.sweep, []);
    sweeps.get(r.sweep).push(r);
  }
  for (const [name, members] of sweeps) {
    const link = k.el("a", { href: `#sweep/${members[0].backend}/${encodeURIComponent(name)}` }, `sweep ${name}`);
    rows.push(k.el("tr", { class: "sweep", "data-sweep": name }, k.el("td", { colspan: 8 }, link, `: ${k.count(members.length, "run")}`)));
    for (const r of members) {
      const row = runRow(r);
      const params = Object.entries(r.params).map(([p, v]) => `${p}=${v}`).join(" ");
      row.cells[0].append(k.el("span", { class: "params" }, ` ${params}`));
      rows.push(row);
    }
  }
  return rows;
}

async function pollRuns() {
  const k = window.kubetune;
  const data = await k.api("/api/runs");
  if (location.hash !== "#runs") return;
  if (data.error) k.say("runs-msg", data.error, "error");
  else {
    k.say("runs-msg", data.messages.join("\n") || k.count(data.runs.length, "run"), data.messages.length ? "warn" : "");
    document.querySelector("#runs-table tbody").replaceChildren(...runsTable(data.runs));
    if (!document.body.dataset.runsReady) window.kubetune.runsReadyAt = performance.now();
    document.body.dataset.runsReady = "true";
  }
  timer = setTimeout(pollRuns, POLL_MS);
}

function sweepGrid(data, step) {
  const k = window.kubetune;
  const head = k.el("tr", {}, k.el("th", {}, "prompt"), ...data.runs.map((r) => k.el("th", {}, r.run,
    k.el("div", { class: "params" }, Object.entries(r.params).map(([p, v]) => `${p}=${v}`).join(" ")))));
  const prompts = Math.max(0, ...data.runs.map((r) => r.prompts.length));
  const rows = [];
  for (let i = 0; i < prompts; i++) {
    rows.push(k.el("tr", { "data-prompt": i }, k.el("td", {}, data.runs[0].prompts[i] || `prompt ${i}`),
      ...data.runs.map((r) => {
        const key = (r.thumbs[step] || {})[i];
        return k.el("td", {}, key ? k.el("img", { src: `/api/runs/${r.backend}/${encodeURIComponent(r.run)}/files/${key}`,
          alt: `${r.run} prompt ${i} step ${step}` }) : "–");
      })));
  }
  document.getElementById("sweep-grid").replaceChildren(head, ...rows);
}

async function pollSweep(backend, name) {
  const k = window.kubetune;
  document.getElementById("sweep-title").textContent = `sweep ${name}`;
  const data = await k.api(`/api/sweeps/${backend}/${encodeURIComponent(name)}`);
  if (!location.hash.startsWith("#sweep/")) return;
  if (data.error) { k.say("sweep-msg", data.error, "error"); timer = setTimeout(() => pollSweep(backend, name), POLL_MS); return; }
  k.say("sweep-msg", k.count(data.runs.length, "run"));
  const keys = [...new Set(data.runs.flatMap((r) => Object.keys(r.params)))].sort();
  document.querySelector("#sweep-table thead").replaceChildren(k.el("tr", {}, ...["Run", ...keys, "Phase", "Step", "Loss"].map((h) => k.el("th", {}, h))));
  document.querySelector("#sweep-table tbody").replaceChildren(...data.runs.map((r) => k.el("tr", { "data-run": r.run },
    k.el("td", {}, k.el("a", { href: `#run/${r.backend}/${encodeURIComponent(r.run)}` }, r.run)),
    ...keys.map((p) => k.el("td", {}, r.params[p] || "–")), k.el("td", { class: `phase-${r.phase}` }, r.phase),
    k.el("td", {}, r.step === null ? "–" : `${r.step}/${r.total || "?"}`), k.el("td", {}, fmt(r.loss)))));
  const select = document.getElementById("sweep-step");
  const chosen = select.value || String(data.steps[data.steps.length - 1] ?? "");
  select.replaceChildren(...data.steps.map((s) => k.el("option", { value: String(s) }, String(s))));
  select.value = chosen;
  select.onchange = () => sweepGrid(data, select.value);
  sweepGrid(data, select.value);
  document.body.dataset.sweepReady = "true";
  if (data.runs.some((r) => !r.done)) timer = setTimeout(() => pollSweep(backend, name), POLL_MS);
}

function chart(svg, points, label) {
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  if (points.length === 0) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", 10); t.setAttribute("y", 80); t.textContent = `no ${label} yet`;
    svg.append(t);
    return;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => 40 + (x1 === x0 ? 0 : ((x - x0) / (x1 - x0)) * 350);
  const sy = (y) => 145 - (y1 === y0 ? 65 : ((y - y0) / (y1 - y0)) * 130);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
  line.setAttribute("data-points", String(points.length));
  svg.append(line);
  for (const [text, x, y] of [[fmt(y1, 3), 0, 15], [fmt(y0, 3), 0, 145], [`step ${x0}`, 40, 158], [`step ${x1}`, 340, 158]]) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.textContent = text;
    svg.append(t);
  }
}

// Only what the server says this run's phase allows: cancel, resume, pull, report.
function offer(actions) {
  for (const id of ["cancel", "resume", "pull"]) document.getElementById(id).hidden = !actions.includes(id);
  document.getElementById("pull-path").hidden = !actions.includes("pull");
  document.getElementById("report-link").hidden = !actions.includes("report");
  document.getElementById("run-actions").dataset.offered = actions.join(" ");
}

async function pollRun(backend, run) {
  const k = window.kubetune;
  const base = `/api/runs/${backend}/${encodeURIComponent(run)}`;
  document.getElementById("run-title").textContent = run;
  const cancel = document.getElementById("cancel");
  cancel.onclick = async () => {
    const result = await k.api(`${base}/cancel`, {});
    k.say("run-msg", result.error || `cancel: ${result.phase}`, result.error ? "error" : "ok");
  };
  const resume = document.getElementById("resume");
  resume.onclick = async () => {
    k.say("run-msg", "resubmitting…");
    const result = await k.api(`${base}/resume`, {});
    k.say("run-msg", result.error || `resubmitted (${result.backend}): it continues from its newest checkpoint`,
      result.error ? "error" : "ok");
    if (!result.error) { clearTimeout(timer); timer = setTimeout(() => pollRun(backend, run), POLL_MS); }
  };
  const pull = document.getElementById("pull");
  const pullPath = document.getElementById("pull-path");
  if (!pullPath.value) pullPath.value = `${run}-final`;
  pull.onclick = async () => {
    k.say("run-msg", "pulling…");
    const result = await k.api(`${base}/pull`, { path: pullPath.value });
    k.say("run-msg", result.error || `pulled ${k.count(result.files.length, "file")} (${(result.bytes / 1e6).toFixed(1)} MB), checked against the manifest, into ${result.dest}`,
      result.error ? "error" : "ok");
  };
  const [data, logs] = await Promise.all([k.api(base), k.api(`${base}/logs?lines=200`)]);
  if (!location.hash.startsWith("#run/")) return;
  document.getElementById("logs").textContent = logs.error || logs.lines.join("\n");
  if (data.error) { offer([]); k.say("run-status", data.error, "error"); timer = setTimeout(() => pollRun(backend, run), POLL_MS); return; }
  const r = data.run;
  const progress = r.step === null ? (r.progress_error || "no progress yet") :
    `step ${r.step}/${r.total || "?"}, loss ${fmt(r.loss)}, ${fmt(r.images_per_second, 3)} img/s${r.eta ? `, ETA ${r.eta}` : ""}${r.ending ? `; ${r.ending}` : ""}`;
  k.say("run-status", `${r.phase}${r.reason ? ` (${r.reason})` : ""}: ${progress}`, `phase-${r.phase}`);
  document.getElementById("run-status").dataset.phase = r.phase;
  chart(document.getElementById("loss-chart"), data.history.filter((h) => h.loss !== undefined).map((h) => [h.step, h.loss]), "loss");
  chart(document.getElementById("lr-chart"), data.history.filter((h) => h.lr !== undefined).map((h) => [h.step, h.lr]), "learning rate");
  const grids = document.getElementById("grids");
  if (grids.dataset.keys !== data.grids.map((g) => g.key).join()) {
    grids.dataset.keys = data.grids.map((g) => g.key).join();
    grids.replaceChildren(...data.grids.map((g) => k.el("figure", { "data-step": g.step },
      k.el("img", { src: `${base}/files/${g.key}`, alt: `validation grid at step ${g.step}` }),
      k.el("figcaption", {}, `step ${g.step}`))));
  }
  document.getElementById("report-link").href = `${base}/files/report.html`;
  offer(data.actions);
  document.getElementById("final-files").replaceChildren(...data.final.map((key) =>
    k.el("a", { href: `${base}/files/${key}`, download: key.split("/").pop(), class: "pull" }, ` ${key}`)));
  if (!r.done) timer = setTimeout(() => pollRun(backend, run), POLL_MS);
}

function showDataset(result) {
  const k = window.kubetune;
  const box = document.getElementById("dataset");
  if (result.error) { box.replaceChildren(k.el("div", { class: "msg error" }, result.error)); return; }
  const most = Math.max(1, ...result.buckets.map((b) => b.count));
  box.replaceChildren(
    k.el("h2", {}, `Dataset: ${k.count(result.count, "example")} (${result.source})`),
    k.el("div", { class: "thumbs" }, ...result.thumbnails.map((t) => k.el("figure", {},
      k.el("img", { src: t.data, alt: t.id }), k.el("figcaption", {}, t.caption || "(no caption)")))),
    k.el("div", { class: "hist" }, k.el("h3", {}, result.bucket_title),
      ...result.buckets.map((b) => {
        const bar = k.el("span", { class: "bar" });
        bar.style.width = `${(200 * b.count) / most}px`;
        return k.el("div", { class: "bucket" }, `${b.label}: ${b.count} `, bar);
      })),
    k.el("div", { class: result.bad.length ? "msg error" : "msg ok" },
      result.bad.length ? `${k.count(result.bad.length, "bad image")}:` : "no bad images found by the header preflight"),
    k.el("ul", { class: "bad" }, ...result.bad.map((b) => k.el("li", {}, b))));
}

async function previewDataset() {
  const k = window.kubetune;
  document.getElementById("dataset").replaceChildren(k.el("div", { class: "msg" }, "reading the dataset listing and headers…"));
  showDataset(await k.api("/api/dataset", { values: k.collect(k.state.current) }));
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("preview").addEventListener("click", previewDataset);
  route();
});
