"use strict";
// medflow page: upload one image to /predict and show probabilities, Grad-CAM and the model.
const $ = (id) => document.getElementById(id);

// human names of the metrics `medflow evaluate` writes (others: the key, underscores as spaces)
const METRIC_LABELS = {
  accuracy: "Accuracy",
  balanced_accuracy: "Balanced accuracy",
  macro_f1: "Macro F1",
  roc_auc: "ROC AUC (one-vs-rest)",
  qwk: "Quadratic weighted kappa",
  ece: "Calibration error (ECE, lower is better)",
  n_test: "Test images",
  n: "Test images",
  num_params: "Parameters",
};
const COUNTS = new Set(["n_test", "n", "num_params"]);

function metricLabel(name) {
  const label = METRIC_LABELS[name] || name.replaceAll("_", " ");
  return label.charAt(0).toUpperCase() + label.slice(1);
}

// a probability as a percentage that never claims certainty: "> 99.9%" / "< 0.1%" at the ends
function percent(p) {
  if (p > 0.999) return "> 99.9%";
  if (p < 0.001) return "< 0.1%";
  return `${(100 * p).toFixed(1)}%`;
}

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
    row.dataset.metric = name;
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = metricLabel(name) + (name === m.metric ? " (used to choose the model)" : "");
    row.append(th);
    row.insertCell().textContent = COUNTS.has(name) && Number.isInteger(value) ? value.toLocaleString("en-US")
      : Number.isInteger(value) ? String(value) : value.toFixed(3);
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
  return list.children.length > 0;
}

function showPrediction(r, unreliable) {
  // the class and its probability; demoted to a small "model output" line when the image is unlike the training data
  const predicted = document.createElement("span");
  predicted.id = "predicted";
  predicted.textContent = r.predicted;
  const confidence = document.createElement("span");
  confidence.id = "confidence";
  confidence.textContent = `(${percent(r.confidence)})`;
  const headline = $("headline");
  const output = $("model-output");
  if (unreliable) {
    headline.textContent = "Prediction not reliable: this image is unlike the training images";
    output.replaceChildren("model output: ", predicted, " ", confidence);
  } else {
    headline.replaceChildren("Predicted: ", predicted, " ", confidence);
    output.replaceChildren();
  }
  output.hidden = !unreliable;
  $("result").classList.toggle("unreliable", unreliable);
}

function showProbabilities(r) {
  const list = $("probabilities");
  list.replaceChildren();
  r.classes.forEach((name, i) => {
    const p = r.probabilities[i];
    const li = document.createElement("li");
    li.dataset.class = name;
    li.dataset.probability = String(p);
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    if (name === r.predicted) {
      li.className = "top";
      const note = document.createElement("span");
      note.className = "visually-hidden";
      note.textContent = " (highest)";
      label.append(note);
    }
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${(100 * p).toFixed(1)}%`;  // CSSOM, allowed by the page's CSP (no style attribute)
    bar.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = percent(p);
    li.append(label, bar, pct);
    list.append(li);
  });
}

function showResult(r) {
  const unreliable = showWarnings(r.warnings);
  showPrediction(r, unreliable);
  showProbabilities(r);
  $("image").src = "data:image/png;base64," + r.image_png_base64;
  $("gradcam").src = "data:image/png;base64," + r.gradcam_png_base64;
  $("gradcam").alt = `Grad-CAM heat map over the image for the class ${r.predicted}: red and yellow mark the ` +
    "regions that most influenced the model's output, blue the regions that influenced it least";
  const i = r.input;
  $("input-info").textContent = `Uploaded: ${i.format}, ${i.width}×${i.height}, ${i.channels} channel(s), ` +
    `${i.bit_depth}-bit · model version ${r.model_version}`;
  $("result").hidden = false;
  return unreliable;
}

async function upload(file) {
  if (!file) return;
  const name = file.name || "the image";
  $("result").hidden = true;
  setStatus(`Analysing ${name}…`, false);
  const form = new FormData();
  form.append("file", file);
  const started = performance.now();
  try {
    const res = await fetch("/predict", { method: "POST", body: form });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) {
      const detail = typeof body.detail === "string" ? body.detail : `HTTP ${res.status}`;
      setStatus(`Could not analyse ${name}: ${detail}`, true);
      return;
    }
    const unreliable = showResult(body);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(`Classified ${name} in ${seconds} s` +
      (unreliable ? " — the image is unlike the training images: see the warnings" : ""), false);
  } catch (err) {
    setStatus(`Upload failed: ${err}`, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    upload(e.target.files[0]);
    e.target.value = "";  // choosing the same file again still uploads it
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    upload(e.dataTransfer.files[0]);
  });
  // a file dropped beside the drop zone must not replace the page with the image
  for (const type of ["dragover", "drop"]) document.addEventListener(type, (e) => e.preventDefault());
  loadModel().catch(() => { $("model-line").textContent = "Model unavailable"; });
});
