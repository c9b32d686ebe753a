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

const SLOW_MS = 4000;  // past this, "still analysing": a CPU prediction with Grad-CAM takes ~0.3 s when idle
let current = null;     // the upload in flight: {id, controller, timer}; a newer one supersedes it
let uploads = 0;

function setStatus(text, busy = false) {
  $("status-text").textContent = text;
  $("spinner").hidden = !busy;
  $("status").classList.toggle("busy", busy);
  $("error").hidden = true;
}

// an error the user can act on: what failed, what to do, and the server's technical detail (to pass on)
function showError(title, hint, detail) {
  setStatus("");
  $("error-title").textContent = title;
  $("error-hint").textContent = hint || "";
  $("error-hint").hidden = !hint;
  $("error-detail").textContent = detail ? `Details: ${detail}` : "";
  $("error-detail").hidden = !detail;
  $("error").hidden = false;
}

// what the page's notes say about the model (set by loadModel)
let testAccuracy = "";

async function loadModel() {
  const res = await fetch("/model");
  if (!res.ok) { $("model-line").textContent = "Model unavailable"; return; }
  const m = await res.json();
  // when `medflow compare` chose it (the record's "created"); an ISO date reads the same everywhere
  const selected = typeof m.created === "string" && m.created ? m.created.slice(0, 10) : "";
  const named = m.version.startsWith(m.model) ? m.version : `${m.model} ${m.version}`;  // versions are "<model>-<hash>"
  $("model-line").textContent = `Model ${named}` + (selected ? ` · selected on ${selected}` : "") +
    ` · classes: ${m.classes.join(", ")}`;
  $("model-version").textContent = m.version;
  $("model-created").textContent = selected ? `, selected as champion on ${selected}` : "";
  const metrics = m.metrics || {};
  const n = metrics.n_test ?? metrics.n;
  if (typeof metrics.accuracy === "number" && Number.isInteger(n)) {
    testAccuracy = `: on ${n.toLocaleString("en-US")} test images this model was right ` +
      `${(100 * metrics.accuracy).toFixed(1)}% of the time`;
  }
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
  confidence.textContent = `(${percent(r.confidence)} confidence)`;
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
  // the test accuracy describes images like the training images only
  $("accuracy-note").textContent = unreliable ? ", and this model's test results say nothing about images unlike " +
    "its training images" : testAccuracy;
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

function showResult(r, name) {
  const unreliable = showWarnings(r.warnings);
  showPrediction(r, unreliable);
  showProbabilities(r);
  $("image").src = "data:image/png;base64," + r.image_png_base64;
  $("gradcam").src = "data:image/png;base64," + r.gradcam_png_base64;
  $("gradcam").alt = `Grad-CAM heat map over the image for the class ${r.predicted}: red and yellow mark the ` +
    "regions that most influenced the model's output, blue the regions that influenced it least";
  $("gradcam-caption").textContent = `Grad-CAM for “${r.predicted}”: where the model looked for this answer. ` +
    "Red = most influence, blue = least. It is not an outline of a parasite or lesion.";
  const i = r.input;
  $("input-info").textContent = `Uploaded: ${name} (${i.format}, ${i.width}×${i.height}, ${i.channels} channel(s), ` +
    `${i.bit_depth}-bit) · model version ${r.model_version}`;
  $("result").hidden = false;
  return unreliable;
}

// the answer in words, for the status line (read out by screen readers)
function answer(r, unreliable) {
  const text = `${r.predicted} (${percent(r.confidence)} confidence)`;
  return unreliable ? `model output ${text}, but the image is unlike the training images: see the warnings` : text;
}

function httpError(res) {
  if (res.status >= 500) return "The server failed while analysing the image. Try again; if it keeps happening, " +
    "tell whoever runs this service.";
  return "";
}

async function upload(file, note = "") {
  if (!file) return;
  if (current) {  // a newer choice wins: the older request is cancelled and its answer never shown
    current.controller.abort();
    clearTimeout(current.timer);
  }
  const job = { id: ++uploads, controller: new AbortController() };
  current = job;
  const name = file.name || "the image";
  $("result").hidden = true;
  $("result").setAttribute("aria-busy", "true");
  const waiting = `Analysing ${name}…` + (note ? ` ${note}` : "");
  setStatus(waiting, true);
  job.timer = setTimeout(() => {
    if (current === job) setStatus(`${waiting} Still working: the server is busy, please wait.`, true);
  }, SLOW_MS);
  const form = new FormData();
  form.append("file", file);
  const started = performance.now();
  try {
    const res = await fetch("/predict", { method: "POST", body: form, signal: job.controller.signal });
    const body = await res.json().catch(() => ({}));
    if (current !== job) return;
    if (!res.ok) {
      const detail = typeof body.detail === "string" ? body.detail : `HTTP ${res.status} ${res.statusText}`.trim();
      const hint = typeof body.hint === "string" ? body.hint : httpError(res);
      showError(`Could not analyse ${name}.`, hint, detail);
      return;
    }
    const unreliable = showResult(body, name);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(`Classified ${name} in ${seconds} s: ${answer(body, unreliable)}.` + (note ? ` ${note}` : ""));
  } catch (err) {
    if (current !== job) return;  // cancelled by a newer upload
    showError(`Could not analyse ${name}: the server did not answer.`,
      "Check that the medflow server is still running and that this computer is on its network, then try again.",
      String(err));
  } finally {
    if (current === job) {
      clearTimeout(job.timer);
      $("result").removeAttribute("aria-busy");
      current = null;
    }
  }
}

// a drop or paste: one image; several files analyse the first (and say so), anything else is explained
function uploadFrom(files) {
  const list = Array.from(files || []);
  if (list.length === 0) {
    showError("Nothing to analyse.", "Drop an image file (not text or a link from a web page), or use " +
      "“Choose a file”.", "");
    return;
  }
  const note = list.length > 1 ? `(${list.length} files were dropped: this page checks one image at a time, ` +
    "so only this first one is analysed; drop the others one by one.)" : "";
  upload(list[0], note);
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    upload(e.target.files[0]);
    e.target.value = "";  // choosing the same file again still uploads it
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", (e) => {
    if (!drop.contains(e.relatedTarget)) drop.classList.remove("over");  // not when moving onto its children
  });
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    uploadFrom(e.dataTransfer.files);
  });
  // a file dropped beside the drop zone must not replace the page with the image
  for (const type of ["dragover", "drop"]) document.addEventListener(type, (e) => e.preventDefault());
  loadModel().catch(() => { $("model-line").textContent = "Model unavailable"; });
});
