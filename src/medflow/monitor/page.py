"""The monitoring page (``report.html`` of a batch): medflow's summary, then Evidently's drift and classification
panels, in one self-contained file.

It opens with a link back to the main report (``../../index.html``), a heading with the batch and its verdict,
the verdict in a sentence, what was checked, a banner when the batch is simulated (``medflow simulate-batch``
marks it), "In brief" (did the images change, is the model still performing, each with its figures and counts,
and what to do: :func:`in_brief`, :func:`next_steps`) and a short "How to read this page"; medflow's own tables
show yes / no, whole counts and "p-value" columns, and what each feature measures with its batch and reference
medians (``drift.medians`` in summary.json, for the page only). Evidently's panels follow, redrawn to agree with
the main report (confusion matrix rows = true class from the top; drift panels with the p-value in full, the
batch vs reference distribution in percent first, drifted columns first).
"""

from __future__ import annotations

import copy
import html
import re
from typing import Any

import numpy as np

from medflow.monitor import monitor_config
from medflow.monitor.verdict import WARNING, counts_toward_verdict, weak_shift

MAIN_REPORT = "../../index.html"  # reports/index.html, seen from reports/monitoring/<batch>/report.html
_EXTERNAL = re.compile(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//", re.IGNORECASE)


def external_references(html: str) -> list[str]:
    """Tags that would load a script, style or image from the network (none in an offline report)."""
    return [m.group(0) for m in _EXTERNAL.finditer(html)]


def champion_test(record: dict[str, Any]) -> dict[str, Any]:
    """The champion's test figures: ``n``, scalar metrics and ``per_class`` {class: {precision, recall, f1,
    support}}. ``medflow compare`` writes the count as ``n_test`` and puts ``per_class`` in ``metrics``; a
    promoted record (registry) also carries ``per_class`` beside ``metrics``."""
    metrics = record.get("metrics") or {}
    out = {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "qwk") if metrics.get(k) is not None}
    n = metrics.get("n", metrics.get("n_test"))
    per_class = metrics.get("per_class") or record.get("per_class") or {}
    names = {"f1-score": "f1", "f1_score": "f1"}  # scikit-learn's classification_report spelling
    per_class = {str(c): {names.get(k, k): v for k, v in (m or {}).items()} for c, m in per_class.items()}
    return {**({"n": int(n)} if n is not None else {}), **out, **({"per_class": per_class} if per_class else {})}


def _fmt(x: Any) -> str:
    """A table cell: yes / no for booleans, 3 decimals for fractions, "-" when missing."""
    if x is None:
        return "-"
    if isinstance(x, bool | np.bool_):
        return "yes" if x else "no"
    return f"{x:.3f}" if isinstance(x, float | np.floating) else str(x)


def _count(x: Any) -> str:
    """A count as a whole number (``7``, not ``7.0``); "-" when missing."""
    return "-" if x is None else str(round(float(x)))


# Per drift-tested column: a short name (the page's plain-word summary) and what it measures, with its unit.
_FEATURE_MEANING = {
    "mean": ("brightness", "brightness: mean grey level (0-255)"),
    "std": ("contrast", "contrast: spread of grey levels (standard deviation, 0-255)"),
    "sharpness": ("sharpness", "sharpness: variance of the Laplacian (lower = blurrier)"),
    "mean_r": ("red level", "red level: mean of the red channel (0-255)"),
    "mean_g": ("green level", "green level: mean of the green channel (0-255)"),
    "mean_b": ("blue level", "blue level: mean of the blue channel (0-255)"),
    "width": ("image width", "image width as found (pixels)"),
    "height": ("image height", "image height as found (pixels)"),
    "prediction": ("predicted class", "the model's predicted class"),
    "confidence": ("confidence", "the model's confidence: probability of its predicted class (0-1)"),
}


def feature_meaning(column: str) -> tuple[str, str]:
    """(short name, what it measures with its unit) of a drift-tested column."""
    if m := re.fullmatch(r"emb_pc(\d+)", column):
        return f"embedding component {m[1]}", f"model embedding, component {m[1]} (no unit)"
    return _FEATURE_MEANING.get(column, (column, column))


def _num(x: float) -> str:
    """A median as the page shows it: whole above 100, 1 decimal above 1, else 3."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 1 else f"{x:.3f}"


def _medians(summary: dict[str, Any], column: str) -> str:
    """"batch / reference" medians of a column; "-" when not recorded (the predicted class, older summaries)."""
    m = (summary["drift"].get("medians") or {}).get(column)
    return "-" if not m else f"{_num(m['batch'])} / {_num(m['reference'])}"


def _summary_widgets(summary: dict[str, Any]) -> list[Any]:
    """Evidently widgets for medflow's own sections: verdict reasons, groups, features, predicted classes, batch vs
    champion (the verdict and the headline figures are in the page's head, :func:`in_brief`)."""
    from evidently.legacy.renderers.html_widgets import table_data

    drift, perf, cfg = summary["drift"], summary["performance"], monitor_config(summary["params"])
    uncorrected = f"p < {cfg.feature_alpha:.3g} (uncorrected)"
    groups = drift["groups"]
    preds = summary["predictions"]
    confidence = preds.get("mean_confidence") or {}
    ref_rows = (summary.get("reference") or {}).get("rows")
    widgets = [
        table_data(title=f"Verdict reasons ('{WARNING.strip()}' lines do not change the verdict)",
                   column_names=["reason"],
                   data=[[r] for r in summary["reasons"]] or [["no drift, no degradation"]]),
        table_data(title=f"Drift by group (Bonferroni within each group: threshold = family_alpha "
                         f"{cfg.family_alpha:.3g} / tests; embeddings also at ROC AUC >= {cfg.embedding_auc:.3g})",
                   column_names=["group", "tests", "smallest p-value", "threshold", "ROC AUC", "drifted",
                                 "drifted features (p-value below threshold)"],
                   data=[[g, _count(v["tests"]), f"{v['min_p']:.3g}", f"{v['threshold']:.3g}", _fmt(v.get("auc")),
                          _fmt(v["drifted"]), ", ".join(v["drifted_features"]) or "none"]
                         for g, v in groups.items()]),
        table_data(title=f"Per-feature drift tests ({_count(summary['n_images'])} batch images vs "
                         f"{_count(ref_rows)} reference images; image statistics, embedding PCs, predictions): "
                         "drifted = p-value below the group threshold",
                   column_names=["feature", "what it measures", "group", "test", "p-value", "group threshold",
                                 "drifted", uncorrected, "counts toward verdict", "median: batch / reference"],
                   data=[[c, feature_meaning(c)[1], v["group"], v["test"], f"{v['p_value']:.3g}",
                          f"{groups[v['group']]['threshold']:.3g}", _fmt(v["drifted"]), _fmt(v["below_feature_alpha"]),
                          _fmt(counts_toward_verdict(v, groups, drift["share_below_feature_alpha"], cfg)),
                          _medians(summary, c)]
                         for c, v in drift["features"].items()]),
        table_data(title="Predicted classes: share of the images the model assigns to each class"
                         + (f" (mean confidence: batch {confidence['batch']:.3f} / reference "
                            f"{confidence['reference']:.3f})" if confidence else ""),
                   column_names=["class", f"batch ({_count(summary['n_images'])} images)",
                                 f"reference ({_count(ref_rows)} training images)"],
                   data=[[c, f"{b:.3f}", f"{preds['reference_share'][c]:.3f}"]
                         for c, b in preds["batch_share"].items()]),
    ]
    if perf:
        tol = cfg.degradation_tolerance
        widgets.append(table_data(
            title=f"Batch vs champion test ({_count(perf['batch']['n'])} labelled, champion test "
                  f"{_count(perf['champion_test'].get('n'))} images; degraded when a verdict metric falls more than "
                  f"{tol:.3g} below the champion's, needs >= {cfg.min_labelled} labelled)",
            column_names=["metric", "batch", "champion test", "degraded below", "counts toward verdict"],
            data=[[k, _fmt(perf["batch"][k]), _fmt(c := perf["champion_test"].get(k)),
                   _fmt(None if c is None else c - tol), _fmt(k in cfg.degradation_metrics)]
                  for k in ("accuracy", "balanced_accuracy", "macro_f1", "qwk") if perf["batch"].get(k) is not None]))
        champ = perf["champion_test"].get("per_class") or {}
        rows = []
        for c, v in perf["batch"]["per_class"].items():
            ch = champ.get(c) or {}
            rows.append([c] + [f"{_fmt(v[k])} / {_fmt(ch.get(k))}" for k in ("precision", "recall", "f1")]
                        + [_count(v["support"]), _count(ch.get("support"))])
        widgets.append(table_data(title=f"Per-class performance, batch / champion test ({_count(perf['batch']['n'])} "
                                        "labelled; recall: share of the class's images the model found; precision: "
                                        "share of the model's answers for the class that were right)",
                                  column_names=["class", "precision", "recall", "F1", "batch support",
                                                "champion test support"], data=rows))
    return widgets


_VERDICT_COLOURS = {"ok": ("#1b5e20", "#e8f5e9"), "drift": ("#7a4f01", "#fff3cd"), "degraded": ("#8b0000", "#fde2e2")}
_BADGE = "border-radius:4px;border:2px solid {fg};color:{fg};background:{bg}"
_METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1",
                 "qwk": "quadratic weighted kappa"}


def _simulated_note(summary: dict[str, Any]) -> str:
    """The banner of a simulated batch: what made it and with which shift (from its marker file)."""
    sim = summary.get("simulation") or {}
    keys = ("shift", "seed") if sim.get("shift") == "none" else ("shift", "strength", "seed")  # no strength to none
    how = ", ".join(f"{k} {sim[k]}" for k in keys if sim.get(k) is not None)
    if sim.get("shuffle_labels"):
        how += ", labels shuffled"
    return ("SIMULATED batch: written by <code>medflow simulate-batch</code> from the pipeline's own held-out test "
            f"images{f' ({html.escape(how)})' if how else ''}, not new images from the field. Retraining never "
            "adds it to the training data.")


def how_to_read(summary: dict[str, Any]) -> str:
    """The "How to read this page" paragraphs (HTML), with this run's thresholds."""
    cfg, groups = monitor_config(summary["params"]), summary["drift"]["groups"]
    per_group = "; ".join(f"{g}: {cfg.family_alpha:.3g} / {v['tests']} = {v['threshold']:.3g}"
                          for g, v in groups.items())
    metrics = " or ".join(_METRIC_NAMES.get(m, m) for m in cfg.degradation_metrics)
    return (
        "<p>The batch is compared with the <em>reference</em>: images the champion model was trained on. "
        "Each feature (image statistics such as brightness, contrast, sharpness and colour; components of the "
        "model's embedding; the predicted class and its confidence) gets a statistical test. Its "
        "<strong>p-value</strong> is lower the more the batch differs from the reference; a high p-value means "
        "no sign of a difference.</p>"
        "<p>With many tests some p-values come out low by chance, so each group's threshold is "
        f"{cfg.family_alpha:.3g} divided by the number of tests in the group (Bonferroni: {per_group}); that "
        "way a group is rarely flagged by chance alone. A feature has <strong>drifted</strong> when its p-value "
        "is below its group's threshold: the same rule in every table, list and Evidently panel on this page.</p>"
        "<p>The <strong>embedding ROC AUC</strong> says how well a classifier tells batch images from reference "
        "images by the model's embeddings: 0.5 when they cannot be told apart, nearer 1 the more they differ "
        f"(drift at {cfg.embedding_auc:.3g} or more).</p>"
        f"<p><strong>Verdict</strong>: <em>degraded</em> when a labelled batch (at least {cfg.min_labelled} "
        f"images with labels) scores more than {cfg.degradation_tolerance:.3g} below the champion's test "
        f"{metrics}; otherwise <em>drift</em> when any group drifted, when at least {cfg.drift_share:.0%} of the "
        f"features have a p-value below {cfg.feature_alpha:.3g} (a broad weak shift no single test catches), or "
        f"when more than {cfg.max_quarantine_share:.0%} of the files were unreadable (quarantined); otherwise "
        "<em>ok</em>.</p>")


# Drift-tested image statistics, what a change in them shows, and its usual causes (the page's next steps).
_CAUSES = (
    (("mean_r", "mean_g", "mean_b"), "colour",
     "a different stain or staining protocol, or another camera's colour balance"),
    (("mean", "std"), "brightness or contrast", "illumination, exposure, stain intensity or scanner settings"),
    (("sharpness",), "sharpness", "focus, blur, stronger JPEG compression or another resolution"),
    (("width", "height"), "image size", "another scanner, magnification or export setting"),
)


def _moved(summary: dict[str, Any], column: str) -> str:
    """"sharpness lower (median 1790 vs 2250 in the reference)": a drifted column, the way it moved."""
    name = feature_meaning(column)[0]
    m = (summary["drift"].get("medians") or {}).get(column)
    if not m:
        return name
    b, r = m["batch"], m["reference"]
    way = "higher" if b > r else "lower" if b < r else "spread differently"
    return f"{name} {way} (median {_num(b)} vs {_num(r)} in the reference)"


def _labelled_enough(summary: dict[str, Any]) -> bool:
    perf = summary["performance"]
    return bool(perf) and perf["batch"]["n"] >= monitor_config(summary["params"]).min_labelled


def _verdict_line(summary: dict[str, Any]) -> str:
    """The verdict in one plain sentence (under the heading)."""
    perf, verdict = summary["performance"], summary["verdict"]
    n = _count(perf["batch"]["n"]) if perf else "0"
    if verdict == "degraded":
        return (f"On this batch's {n} labelled images the model scored clearly below its figures on its own test "
                "set.")
    looks = ("These images differ from the images the model was trained on" if verdict == "drift" else
             "These images look like the images the model was trained on")
    if not perf:
        return f"{looks}; the model's performance was not checked (the batch has no labelled images)."
    if not _labelled_enough(summary):
        return f"{looks}; with {n} labelled images there are too few to check the model's performance."
    return f"{looks}, and the model did not score clearly worse on the batch's {n} labelled images."


def _image_answer(summary: dict[str, Any]) -> tuple[str, str]:
    """"Did the images change?": the answer and the figures behind it."""
    drift, cfg = summary["drift"], monitor_config(summary["params"])
    groups, n = drift["groups"], drift["n_features"]
    parts = []
    img, emb, pred = (groups.get(g) or {} for g in ("image", "embedding", "prediction"))
    if img.get("drifted"):
        moved = [_moved(summary, c) for c in img["drifted_features"]]
        causes = [f"{what}: {why}" for cols, what, why in _CAUSES if set(cols) & set(img["drifted_features"])]
        parts.append(f"<strong>Yes</strong>: the image statistics moved: {'; '.join(moved)}. Possible causes: "
                     f"{'; '.join(causes)}.")
    if emb.get("drifted"):
        auc = emb.get("auc")
        how = (f"a classifier tells batch from reference images by their embeddings with ROC AUC {auc:.3f}"
               if auc is not None and auc >= cfg.embedding_auc else
               "embedding components moved: " + ", ".join(emb["drifted_features"]))
        parts.append(f"{'<strong>Yes</strong>: t' if not parts else 'T'}he model sees these images differently "
                     f"({how}), even where no simple image statistic explains why.")
    if pred.get("drifted"):
        parts.append(f"{'<strong>Yes</strong>: t' if not parts else 'T'}he model's answers are spread differently ("
                     f"{'; '.join(_moved(summary, c) for c in pred['drifted_features'])}): a different mix of "
                     "patients or classes, or images the model is less sure of.")
    if weak_shift(drift["share_below_feature_alpha"], cfg):
        parts.append(f"{'<strong>Yes</strong>: m' if not parts else 'M'}any features moved a little at once "
                     f"({drift['share_below_feature_alpha']:.0%} of them have p &lt; {cfg.feature_alpha:.3g}), a "
                     "broad weak shift no single test catches.")
    if summary["quarantine_share"] > cfg.max_quarantine_share:
        parts.append(f"{_count(summary['n_quarantined'])} of {_count(summary['n_found'])} files could not be used "
                     f"(quarantined, more than {cfg.max_quarantine_share:.0%}): see quarantine.csv beside this page.")
    if not parts:
        parts.append("<strong>No</strong> sign of a change: no feature moved beyond chance.")
    evidence = (f"{_count(drift['drifted_count'])} of {_count(n)} features drifted (p-value below their group's "
                f"threshold); {_count(drift['below_feature_alpha_count'])} of {_count(n)} "
                f"({drift['share_below_feature_alpha']:.0%}) have p &lt; {cfg.feature_alpha:.3g} uncorrected (a broad "
                f"weak shift from {cfg.drift_share:.0%}); embedding ROC AUC {drift['embedding_auc']:.3f} (0.5 = no "
                f"difference, drift from {cfg.embedding_auc:.3g}). The reference: "
                f"{_count((summary.get('reference') or {}).get('rows'))} of the model's training images.")
    return " ".join(parts), evidence


def _performance_answer(summary: dict[str, Any]) -> tuple[str, str]:
    """"Is the model still performing?": the answer and the figures behind it."""
    perf, cfg = summary["performance"], monitor_config(summary["params"])
    if not perf:
        why = ("its folders are not classes of the model (see the warning above)" if summary.get("unknown_labels")
               else "it has no labelled images")
        return (f"<strong>Not checked</strong>: {why}.",
                (f"Performance is checked on images in class folders (<code>&lt;batch&gt;/&lt;class&gt;/</code>); "
                 f"at least {cfg.min_labelled} are needed for a verdict."))
    batch, champ, n = perf["batch"], perf["champion_test"], perf["batch"]["n"]
    if summary["verdict"] == "degraded":
        answer = "<strong>No</strong>: it scored clearly below its test-set figures on this batch."
    elif n < cfg.min_labelled:
        answer = (f"<strong>Not judged</strong>: only {_count(n)} labelled images (at least {cfg.min_labelled} needed); "
                  "the figures are indicative only.")
    else:
        answer = "<strong>Yes</strong>: no clear drop from its test-set figures."
    n_test = champ.get("n")
    test = f"its {_count(n_test)} test images" if n_test is not None else "its test set"
    figures = [f"{_METRIC_NAMES.get(k, k)} {batch[k]:.3f} (on {test}: {champ[k]:.3f}; degraded below "
               f"{champ[k] - cfg.degradation_tolerance:.3f})"
               for k in cfg.degradation_metrics if batch.get(k) is not None and champ.get(k) is not None]
    confusion = batch.get("confusion")
    if confusion:
        right = sum(row[i] for i, row in enumerate(confusion))
        figures.insert(0, f"{_count(right)} of {_count(n)} labelled images right")
        found = [f"{html.escape(c)} {_count(row[i])} of {_count(sum(row))}"
                 for i, (c, row) in enumerate(zip(batch["per_class"], confusion)) if sum(row)]
        figures.append("images of each class the model found (recall): " + ", ".join(found))
    figures.append(f"with {_count(n)} images, one image more or less right moves accuracy by {1 / n:.3f}")
    return answer, "; ".join(figures) + "."


_RETRAIN = ("If the nightly monitoring flow checked this batch, this verdict also starts retraining: the batch's "
            "labelled class folders, if any, join the training data (a simulated batch's never do), and the new model "
            "replaces the deployed one only if it beats it on the same test set (README, Scheduled retraining).")


def next_steps(summary: dict[str, Any]) -> list[str]:
    """What the verdict asks of the reader (HTML items), from the verdict and what it rests on."""
    cfg, verdict, drift = monitor_config(summary["params"]), summary["verdict"], summary["drift"]
    groups = drift["groups"]
    steps = []
    if summary.get("simulated"):
        steps.append("This batch is <strong>simulated</strong> (a test of the monitor): nothing to do in the clinic"
                     + (". The steps below say what a real batch with this verdict would call for."
                        if verdict != "ok" else "."))
    enough = _labelled_enough(summary)
    label_it = (f"put at least {cfg.min_labelled} images of this kind, labelled, into class folders "
                "(<code>&lt;batch&gt;/&lt;class&gt;/</code>) and run <code>medflow monitor</code> on them")
    if verdict == "ok":
        if not summary.get("simulated"):
            steps.append("Nothing to do.")
        if not enough:
            steps.append(f"To check the model's performance as well, {label_it}.")
    elif verdict == "drift":
        images = any(groups.get(g, {}).get("drifted") for g in ("image", "embedding")) or weak_shift(
            drift["share_below_feature_alpha"], cfg)
        if images:
            steps.append("Find out what changed: ask the lab or site whether the scanner, microscope, stain, staining "
                         "protocol or image export changed for this batch, and compare a few of its images with "
                         "training images (the per-feature table and the distributions below show what moved).")
        if groups.get("prediction", {}).get("drifted"):
            steps.append("Check whether the mix of patients changed (e.g. more positive cases): the predicted-classes "
                         "table below compares the model's answers with the reference.")
        if summary["quarantine_share"] > cfg.max_quarantine_share:
            steps.append("Open <code>quarantine.csv</code> beside this page: it lists the files that could not be "
                         "used and why; fix the export or the files and monitor the batch again.")
        steps.append("The model still scored as expected on this batch's labelled images: it can stay in use; "
                     "watch the next batches from the same source." if enough else
                     "Until the model has been checked on labelled images of this kind, treat its answers on them "
                     f"with caution: {label_it}.")
        steps.append(_RETRAIN)
    else:
        steps += [("Stop relying on the model's answers for images like these (same site, scanner or stain) and "
                   "tell the people who use them."),
                  ("Rule out a labelling error first: images in the wrong class folder also look like a drop (see "
                   "the confusion matrix below: which true class is answered wrongly)."),
                  ("Then retrain with labelled images of this kind, or go back to the previous model with "
                   "<code>medflow rollback</code> if it did better on such images."),
                  _RETRAIN]
    if summary.get("unknown_labels"):
        steps.append("Rename the folders named in the warning above to a class of the model (or to "
                     "<code>unlabelled/</code>) and monitor the batch again.")
    return steps


def in_brief(summary: dict[str, Any]) -> str:
    """The "In brief" section (HTML): the batch's questions answered in plain words with their figures, and the
    next steps."""
    image, image_why = _image_answer(summary)
    perf, perf_why = _performance_answer(summary)
    rows = [("Did the images change (scanner, stain, blur)?", image, image_why),
            ("Is the model still performing?", perf, perf_why)]
    table = "".join(f'<tr><th scope="row">{q}</th><td>{a}<div class="why">{w}</div></td></tr>\n' for q, a, w in rows)
    steps = "".join(f"<li>{s}</li>" for s in next_steps(summary))
    return (f'<table class="brief">\n{table}</table>\n'
            f'<h3>What to do</h3>\n<ol class="next-steps">{steps}</ol>\n')


_CSS = """<style>
.medflow-head{font-family:sans-serif;margin:16px 24px;max-width:72em;line-height:1.45}
.medflow-head table.brief{border-collapse:collapse;width:100%}
.medflow-head table.brief th,.medflow-head table.brief td{border-top:1px solid #ccc;padding:8px;text-align:left;
  vertical-align:top}
.medflow-head table.brief th{width:15em}
.medflow-head .why{color:#444;font-size:0.9em;margin-top:4px}
.medflow-head .meta{color:#444}
.medflow-head code{overflow-wrap:anywhere}
@media (max-width:760px){.medflow-head{margin:8px 10px}.medflow-head table.brief th,.medflow-head table.brief td{
  display:block;width:auto;border:0;padding:4px 0}.medflow-head table.brief tr{display:block;
  border-top:1px solid #ccc;padding:6px 0}}
/* Evidently's cards clip what is wider than the screen: scroll instead; narrow screens: tighter table cells */
.MuiCard-root{overflow-x:auto!important}
@media (max-width:1100px){.MuiTableCell-root{padding:4px 6px!important;font-size:0.8rem!important}
  .MuiCardContent-root{padding:8px!important}}
</style>"""


def _page_head(page: str, summary: dict[str, Any]) -> str:
    """Add a <title>, the page's CSS and, above Evidently's panels, a link back to the main report, an <h1> naming
    the batch and its verdict (colour and text), the verdict in a sentence, what was checked, a SIMULATED banner
    when the batch is simulated, the warnings, "In brief" (answers and next steps) and "How to read this page"."""
    batch, verdict = html.escape(summary["batch"]), summary["verdict"]
    fg, bg = _VERDICT_COLOURS[verdict]
    simulated = bool(summary.get("simulated"))
    sim_fg, sim_bg = "#4a148c", "#f3e5f5"
    badge = (f' <span class="simulated-badge" style="{_BADGE.format(fg=sim_fg, bg=sim_bg)};padding:0 8px">'
             "SIMULATED</span>"
             if simulated else "")
    time = str(summary.get("time") or "").replace("T", " ").replace("+00:00", " UTC")
    meta = (f"{_count(summary['n_images'])} images from <code>{html.escape(str(summary.get('source', '')))}</code> "
            f"({_count(summary['n_quarantined'])} of {_count(summary.get('n_found', summary['n_images']))} files "
            f"quarantined: unreadable or unusable), checked {html.escape(time)} with model "
            f"<code>{html.escape(str(summary['champion']['version']))}</code> against the images it was trained on "
            "(the reference).")
    head = (f'<header class="medflow-head">\n'
            f'<nav><a class="back" href="{MAIN_REPORT}">&larr; Back to the main report</a></nav>\n'
            f'<h1>medflow monitoring: {batch} - verdict <span class="verdict verdict-{verdict}" '
            f'style="{_BADGE.format(fg=fg, bg=bg)};padding:0 8px">{verdict.upper()}</span>{badge}</h1>\n'
            f'<p class="verdict-line" style="{_BADGE.format(fg=fg, bg=bg)};padding:8px">'
            f"<strong>{verdict.upper()}</strong>: {_verdict_line(summary)}</p>\n"
            f'<p class="meta">{meta}</p>\n'
            + (f'<p class="simulated" style="{_BADGE.format(fg=sim_fg, bg=sim_bg)};padding:8px">'
               f"{_simulated_note(summary)}</p>\n" if simulated else "")
            + "".join(f'<p class="warning" style="{_BADGE.format(fg="#7a4f01", bg="#fff3cd")};padding:8px">'
                      f"<strong>Warning:</strong> {html.escape(r.removeprefix(WARNING))}</p>\n"
                      for r in summary["reasons"] if r.startswith(WARNING))
            + f'<section class="in-brief"><h2>In brief</h2>\n{in_brief(summary)}</section>\n'
            + f'<section class="how-to-read"><h2>How to read this page</h2>\n{how_to_read(summary)}</section>\n'
            "</header>")
    title = f"medflow monitoring: {batch} ({verdict})"
    page = page.replace("<head>", f"<head>\n<title>{title}</title>\n{_CSS}", 1)
    return re.sub(r'<body>(\s*<div id="root_)', lambda m: f"<body>\n{head}{m.group(1)}", page, count=1)


def _drift_panels(widgets: list[Any], summary: dict[str, Any]) -> list[Any]:
    """Evidently's per-column drift panels, made readable: the column's meaning in its heading, the p-value and
    threshold in full (Evidently rounds its "drift score" to 3 decimals: 3e-07 reads 0.0), the distribution of
    batch vs reference first and in percent (the batch and the reference differ in size), named axes, and the
    drifted columns first."""
    features = summary["drift"]["features"]
    blocks: list[tuple[str | None, list[Any]]] = []
    for w in copy.deepcopy(widgets):
        counters = (w.params or {}).get("counters") if w.type == "counter" else None
        m = re.fullmatch(r"Drift in column '(.+)'", str(counters[0]["value"])) if counters else None
        if m:
            blocks.append((m[1], [w]))
            f = features.get(m[1])
            label = str(counters[0]["label"])
            if f is not None:
                label = re.sub(r"Drift score: \S+$", f"p-value {f['p_value']:.3g} (drift below {f['threshold']:.3g})",
                               label)
            counters[0]["label"] = f"{feature_meaning(m[1])[1]}. {label}"
            continue
        if not blocks:
            blocks.append((None, []))
        column = blocks[-1][0]
        blocks[-1][1].append(w)
        if w.type == "tabs" and w.tabs:
            meaning = feature_meaning(column)[1] if column else ""
            w.tabs.sort(key=lambda t: t.title != "DATA DISTRIBUTION")
            for t in w.tabs:
                layout = (t.widget.params or {}).get("layout") or {}
                if t.title == "DATA DISTRIBUTION":
                    t.title = "Distribution: batch vs reference"
                    _percent_view(t.widget.params)
                    layout.setdefault("xaxis", {})["title"] = {"text": meaning}
                elif t.title == "DATA DRIFT":
                    t.title = "Batch values in file order"
                    layout.setdefault("xaxis", {})["title"] = {
                        "text": "position of the image in the batch (file order, binned; not time)"}
                for trace in (t.widget.params or {}).get("data") or []:
                    name = str(trace.get("name", ""))
                    trace["name"] = name.replace("current", "this batch").replace("reference", "reference (training)")
    drifted = [b for b in blocks if b[0] in features and features[b[0]]["drifted"]]
    return [w for _, ws in drifted + [b for b in blocks if b not in drifted] for w in ws]


def _percent_view(params: dict[str, Any] | None) -> None:
    """Show an Evidently distribution plot in percent (its "perc" button) rather than counts."""
    menus = ((params or {}).get("layout") or {}).get("updatemenus") or []
    for menu in menus:
        buttons = menu.get("buttons") or []
        for i, b in enumerate(buttons):
            if b.get("label") == "perc" and len(b.get("args") or []) >= 2:
                for trace, visible in zip(params["data"], b["args"][0].get("visible") or []):
                    trace["visible"] = visible
                params["layout"].setdefault("yaxis", {})["title"] = {"text": "% of images"}
                menu["active"] = i


def _classification_panels(widgets: list[Any], summary: dict[str, Any]) -> list[Any]:
    """Evidently's classification panels, made to agree with the main report: the confusion matrix with rows =
    true class from the top (Evidently draws the first row at the bottom), axes named "true class" and "model's
    answer", each cell's share of its row, a white-to-blue scale (its red-blue one paints the correct cells like
    alarms); its per-label heat map (the per-class table's figures on a colour scale stretched over a few points)
    is left out."""
    n = _count(summary["performance"]["batch"]["n"])
    out: list[Any] = []
    skip_next = False
    for w in copy.deepcopy(widgets):
        counters = (w.params or {}).get("counters") if w.type == "counter" else None
        label = str(counters[0]["label"]) if counters else ""
        if skip_next:
            skip_next = False
            if w.type == "big_graph":
                continue
        if label == "Classification Quality by Label":
            skip_next = True
            continue
        if label == "Confusion Matrix":
            counters[0]["label"] = (f"Confusion matrix ({n} labelled images): rows = true class (the batch's label), "
                                    "columns = the model's answer; each cell: images and share of its row")
        if w.title == "Current: Model Quality Metrics":
            w.title = f"This batch ({n} labelled images)"
        if w.type == "big_graph":
            _confusion_view(w.params or {})
        out.append(w)
    return out


def _confusion_view(params: dict[str, Any]) -> None:
    """Redraw an Evidently confusion-matrix heat map the main report's way (see :func:`_classification_panels`)."""
    layout, data = params.get("layout") or {}, params.get("data") or []
    title = ((layout.get("xaxis") or {}).get("title") or {})
    if not data or data[0].get("type") != "heatmap" or title.get("text") != "Predicted Value":
        return
    z = np.asarray(data[0]["z"], dtype=float)
    rows = z.sum(axis=1, keepdims=True)
    share = np.divide(z, rows, out=np.zeros_like(z), where=rows > 0)
    data[0]["text"] = [[f"{int(v)}<br>({s:.0%})" for v, s in zip(zr, sr)] for zr, sr in zip(z, share)]
    layout["xaxis"]["title"] = {"text": "model's answer"}
    layout.setdefault("yaxis", {}).update(title={"text": "true class"}, autorange="reversed")
    layout["coloraxis"] = {"colorscale": [[0.0, "#f7fbff"], [0.5, "#6baed6"], [1.0, "#08306b"]], "cmin": 0,
                           "colorbar": {"title": {"text": "images"}}}


def render_report(summary: dict[str, Any], drift_snap: Any, cls_snap: Any | None) -> str:
    """One self-contained HTML page: medflow summary, Evidently classification report (when the batch has labels),
    Evidently drift report."""
    from evidently.core.metric_types import render_widgets
    from evidently.legacy.renderers.html_widgets import group_widget, header_text

    # Snapshot widgets are Evidently's own rendering of each report (what Snapshot.save_html renders).
    groups = [group_widget(title="Monitoring summary", widgets=_summary_widgets(summary))]
    if cls_snap is not None:
        positive = summary["performance"]["positive_class"]
        note = (f"Precision / recall / F1 are those of the positive class: {positive}" if positive else
                "No positive class: precision / recall / F1 per class (a single figure is a macro average)")
        groups.append(group_widget(title="Classification quality of the labelled batch (Evidently; per-class figures: "
                                         "the per-class table above)",
                                   widgets=[header_text(label=note),
                                            *_classification_panels(cls_snap._widgets, summary)]))
    groups.append(group_widget(title="Drift per column (Evidently): 'drift detected' when the p-value is below the "
                                     "column's group threshold (Bonferroni, as the verdict); drifted columns first; "
                                     "distributions in percent of each set's images",
                               widgets=_drift_panels(drift_snap._widgets, summary)))
    page = _page_head(render_widgets(groups), summary)
    if external := external_references(page):
        raise RuntimeError(f"the report would load from the network: {external[:3]}")
    return page
