"use strict";
// medflow page: upload one image to /predict and show probabilities, Grad-CAM and the model.
const $ = (id) => document.getElementById(id);

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModel() {
  const res = await fetch("/model");
  if (!res.ok) { $("model-line").textContent = "Model unavailable"; return; }
  const m = await res.json();
  $("model-line").textContent = `Model ${m.model} · classes: ${m.classes.join(", ")}`;
  $("model-version").textContent = m.version;
  const body = $("metrics").tBodies[0];
  body.replaceChildren();
  for (const [name, value] of Object.entries(m.metrics || {})) {
    if (typeof value !== "number") continue;  // scalars only (skip intervals, tables)
    const row = body.insertRow();
    row.insertCell().textContent = name + (name === m.metric ? " (selection metric)" : "");
    row.insertCell().textContent = Number.isInteger(value) ? String(value) : value.toFixed(3);
  }
}

function showWarnings(warnings) {
  // the image is unlike the training images (format, colour, bit depth, brightness, contrast, sharpness)
  const list = $("warning-list");
  list.replaceChildren();
  for (const text of warnings || []) {
    const li = document.createElement("li");
    li.textContent = text;
    list.append(li);
  }
  $("warnings").hidden = list.children.length === 0;
}

function showResult(r) {
  showWarnings(r.warnings);
  $("predicted").textContent = r.predicted;
  $("confidence").textContent = `(${(100 * r.confidence).toFixed(1)}%)`;
  const list = $("probabilities");
  list.replaceChildren();
  r.classes.forEach((name, i) => {
    const p = r.probabilities[i];
    const li = document.createElement("li");
    li.dataset.class = name;
    li.dataset.probability = String(p);
    if (name === r.predicted) li.className = "top";
    const label = document.createElement("span");
    label.textContent = name;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    bar.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = `${(100 * p).toFixed(1)}%`;
    li.append(label, bar, pct);
    list.append(li);
  });
  $("image").src = "data:image/png;base64," + r.image_png_base64;
  $("gradcam").src = "data:image/png;base64," + r.gradcam_png_base64;
  const i = r.input;
  $("input-info").textContent = `Uploaded: ${i.format}, ${i.width}×${i.height}, ${i.channels} channel(s), ` +
    `${i.bit_depth}-bit · model version ${r.model_version}`;
  $("result").hidden = false;
}

async function upload(file) {
  if (!file) return;
  $("result").hidden = true;
  setStatus(`Analysing ${file.name}…`, false);
  const form = new FormData();
  form.append("file", file);
  try {
    const res = await fetch("/predict", { method: "POST", body: form });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) {
      const detail = typeof body.detail === "string" ? body.detail : `HTTP ${res.status}`;
      setStatus(`Could not analyse this file: ${detail}`, true);
      return;
    }
    showResult(body);
    setStatus("Done.", false);
  } catch (err) {
    setStatus(`Upload failed: ${err}`, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => upload(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    upload(e.dataTransfer.files[0]);
  });
  loadModel().catch(() => { $("model-line").textContent = "Model unavailable"; });
});
