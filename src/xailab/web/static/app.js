// The xailab page: plain JavaScript over the JSON API (no build step). Everything it shows comes from
// /api/runs, /api/methods, /api/reports, /api/runs/<run>/samples and /api/runs/<run>/explain.
"use strict";

const DEFAULT_METHODS = ["gradcam", "integrated_gradients", "saliency"];
const state = { image: null, imageName: "" };
const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function runUrl(run, suffix) {
  // Run names may hold "/" (runs of a study); each part is encoded, the server checks the whole name.
  return "/api/runs/" + run.split("/").map(encodeURIComponent).join("/") + suffix;
}

async function getJson(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

function setStatus(text, isError = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function checked(container) {
  return [...document.querySelectorAll(`${container} input:checked`)].map((box) => box.value);
}

async function loadRuns() {
  const runs = await getJson("/api/runs");
  const box = $("#runs");
  box.replaceChildren();
  if (!runs.length) {
    box.append(el("em", { text: "no runs yet: train one with `xailab train`" }));
    return;
  }
  const firstHealthy = runs.findIndex((run) => run.status !== "broken");
  runs.forEach((run, i) => {
    const input = el("input", { type: "checkbox", value: run.run });
    input.checked = i === firstHealthy;
    input.addEventListener("change", () => { loadSamples(); updateButton(); });
    if (run.status === "broken") {
      // listed so that it can be fixed, never selectable: the server refuses it and says why
      input.disabled = true;
      box.append(el("label", { class: "run broken", title: run.error || "" }, input, ` ${run.run}`,
        el("small", { text: ` — broken: ${run.error || "unreadable run folder"}` })));
      return;
    }
    const accuracy = run.test_accuracy == null ? "" : ` — test accuracy ${(100 * run.test_accuracy).toFixed(2)}%`;
    box.append(el("label", { class: "run" }, input, ` ${run.run}`, el("small", { text: accuracy })));
  });
}

async function loadMethods() {
  const methods = await getJson("/api/methods");
  const box = $("#methods");
  box.replaceChildren();
  for (const method of methods) {
    const input = el("input", { type: "checkbox", value: method.name });
    input.checked = DEFAULT_METHODS.includes(method.name);
    input.addEventListener("change", updateButton);
    box.append(el("label", { class: "method", title: method.description }, input, ` ${method.name}`));
  }
}

async function loadSamples() {
  const box = $("#samples");
  box.replaceChildren();
  const [run] = checked("#runs");
  if (!run) return;
  try {
    const samples = await getJson(runUrl(run, "/samples"));
    for (const sample of samples) {
      const img = el("img", { src: sample.url, alt: `test image ${sample.index}, label ${sample.label}`,
                              title: `label ${sample.label}`, class: "sample" });
      img.addEventListener("click", async () => {
        const blob = await (await fetch(sample.url)).blob();
        useImage(blob, `${run} test image ${sample.index} (label ${sample.label})`);
      });
      box.append(img);
    }
  } catch (err) {
    box.append(el("small", { text: `no test images: ${err.message}` }));
  }
}

async function loadReports() {
  const list = $("#report-list");
  const reports = await getJson("/api/reports");
  list.replaceChildren();
  if (!reports.length) list.append(el("li", { text: "no report.html under the runs folder yet" }));
  for (const report of reports) {
    list.append(el("li", {}, el("a", { href: report.url, target: "_blank", text: report.name })));
  }
}

function useImage(blob, name) {
  state.image = blob;
  state.imageName = name;
  const preview = $("#input-preview");
  preview.replaceChildren(el("img", { src: URL.createObjectURL(blob), alt: "input image" }),
                          el("span", { text: name }));
  updateButton();
  explainAll();
}

function updateButton() {
  $("#go").disabled = !(state.image && checked("#runs").length && checked("#methods").length);
}

function bars(top) {
  const list = el("ol", { class: "bars" });
  for (const cls of top) {
    const pct = (100 * cls.probability).toFixed(1);
    const bar = el("span", { class: "bar" });
    bar.style.width = `${Math.max(0.5, 100 * cls.probability)}%`;
    list.append(el("li", {}, el("span", { class: "cls", text: cls.name }), el("span", { class: "track" }, bar),
                   el("span", { class: "pct", text: `${pct}%` })));
  }
  return list;
}

function tile(imagePng, map) {
  const heat = el("img", { src: map.heatmap_png, alt: `${map.method} heatmap`, class: "heatmap" });
  heat.style.opacity = $("#opacity").value;
  return el("figure", { class: "tile" },
    el("div", { class: "stack" }, el("img", { src: imagePng, alt: "input", class: "base" }), heat),
    el("figcaption", { text: `${map.method} · ${(1000 * map.seconds).toFixed(0)} ms` }));
}

async function explainOne(run, card) {
  const form = new FormData();
  form.append("file", state.image, "upload");
  form.append("methods", checked("#methods").join(","));
  form.append("top_k", $("#topk").value || "5");
  // method parameters as {"[METHOD.]KEY": value}; the server validates them and names a bad one
  if ($("#params").value.trim()) form.append("params", $("#params").value.trim());
  try {
    const result = await getJson(runUrl(run, "/explain"), { method: "POST", body: form });
    const best = result.top[0];
    card.replaceChildren(
      el("h3", { text: run }),
      el("p", { class: "predicted" }, "predicted ", el("strong", { text: best.name }),
         ` (${(100 * best.probability).toFixed(1)}%)`),
      bars(result.top),
      el("div", { class: "tiles" }, ...result.maps.map((map) => tile(result.image_png, map))));
    card.dataset.predicted = best.name;
  } catch (err) {
    card.replaceChildren(el("h3", { text: run }), el("p", { class: "error", text: err.message }));
  }
}

async function explainAll() {
  const runs = checked("#runs");
  if (!state.image || !runs.length || !checked("#methods").length) return;
  const results = $("#results");
  results.replaceChildren();
  setStatus("explaining…");
  const started = performance.now();
  const cards = runs.map((run) => {
    const card = el("article", { class: "result", "data-run": run }, el("h3", { text: run }), el("p", { text: "…" }));
    results.append(card);
    return explainOne(run, card);
  });
  await Promise.all(cards);
  setStatus(`done in ${((performance.now() - started) / 1000).toFixed(1)} s`);
}

function wire() {
  $("#file").addEventListener("change", (e) => { if (e.target.files[0]) useImage(e.target.files[0], e.target.files[0].name); });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) useImage(e.dataTransfer.files[0], e.dataTransfer.files[0].name);
  });
  $("#opacity").addEventListener("input", (e) => {
    for (const heat of document.querySelectorAll("img.heatmap")) heat.style.opacity = e.target.value;
  });
  $("#go").addEventListener("click", explainAll);
}

async function main() {
  wire();
  try {
    await Promise.all([loadRuns(), loadMethods()]);
    await loadSamples();
  } catch (err) {
    setStatus(err.message, true);
  }
  updateButton();
  loadReports().catch((err) => { $("#report-list").replaceChildren(el("li", { text: err.message })); });
}

main();
