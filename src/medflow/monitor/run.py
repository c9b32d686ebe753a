"""The monitoring stage: ingest a batch, predict with the champion, Evidently drift + classification report,
verdict; writes ``out_root/<batch>/{report.html, summary.json, predictions.csv, quarantine.csv,
ingest_summary.json}`` and appends a line to ``out_root/history.csv``.

The page (``report.html``) opens with a link back to the main report (``../../index.html``), a heading with
the batch and its verdict, a banner when the batch is simulated (``medflow simulate-batch`` marks it) and a
short "How to read this page"; medflow's own tables show yes / no, whole counts and "p-value" columns.

Images in a folder that is not one of the champion's classes are monitored for drift without a performance
check: ``batch/unlabelled/`` (:data:`UNLABELLED`) quietly, any other (``Babesia/``, ``parasitized/`` for
``Parasitized``) with a warning in the reasons, on the page and as ``unknown_labels`` in summary.json. A batch
that cannot be checked (no image, none usable: :class:`NoUsableImage`) raises and leaves nothing under
``out_root``; the monitoring flow then records it with :func:`record_failure` (a ``failed`` line in history.csv,
no folder, so the fixed batch gets its name back).
"""

from __future__ import annotations

import html
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medflow.config import Params
from medflow.io import atomic_write, atomic_write_json
from medflow.layout import batch_name, free_name
from medflow.monitor import MonitorConfig, monitor_config
from medflow.monitor.drift import (
    classification_snapshot,
    drift_snapshot,
    drift_values,
    embedding_auc,
)
from medflow.monitor.features import (
    ReferenceData,
    feature_frame,
    load_champion,
    model_inputs,
    pc_columns,
    reference_features,
)
from medflow.monitor.simulate import simulation_settings
from medflow.monitor.verdict import counts_toward_verdict, decide, group_drift

# New columns go at the end; a history.csv written before them is rewritten with them (blank) on the next line.
# ``location``: where the files of a batch that could not be checked are now (blank on other lines).
HISTORY_COLUMNS = ["time", "batch", "verdict", "n_images", "n_quarantined", "drift_share", "drifted_groups",
                   "embedding_auc", "accuracy", "macro_f1", "champion_version", "reasons", "report", "summary",
                   "simulated", "location"]
FAILED = "failed"  # the history verdict of a batch that could not be checked (see record_failure)
UNLABELLED = ("unlabelled", "unlabeled")  # folder (or label) names, any case, of images without a label
WARNING = "warning: "  # starts a reason that does not change the verdict
MAIN_REPORT = "../../index.html"  # reports/index.html, seen from reports/monitoring/<batch>/report.html
_EXTERNAL = re.compile(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//", re.IGNORECASE)


def external_references(html: str) -> list[str]:
    """Tags that would load a script, style or image from the network (none in an offline report)."""
    return [m.group(0) for m in _EXTERNAL.finditer(html)]


def _performance(current: pd.DataFrame, proba: np.ndarray, champion_record: dict[str, Any],
                 bins: int) -> dict[str, Any] | None:
    """scikit-learn metrics (medflow.evaluate.compute_metrics) of the rows whose label is a champion class.

    ``macro_f1`` averages the classes present in the batch (a class-prior shift that leaves a class out
    must not count as a performance drop); ``per_class`` lists every class (support 0 when absent).
    """
    from sklearn.metrics import f1_score

    from medflow.evaluate import compute_metrics

    classes = list(champion_record["classes"])
    known = current["label"].isin(classes).to_numpy()
    if not known.any():
        return None
    y = current.loc[known, "label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=int)
    m = compute_metrics(y, proba[known], classes, ordered=bool(champion_record.get("ordered", False)),
                        bootstrap=0, bins=bins)
    m["macro_f1"] = float(f1_score(y, proba[known].argmax(axis=1), labels=np.unique(y), average="macro",
                                   zero_division=0))
    return {k: m.get(k) for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "qwk", "per_class", "confusion")
            if k in m}


def unknown_labels(labels: pd.Series, classes: list[str]) -> dict[str, int]:
    """Images per label (class folder) that is neither a champion class nor one of :data:`UNLABELLED`."""
    other = labels[~labels.isin(classes) & ~labels.str.casefold().isin(UNLABELLED)]
    return {str(k): int(v) for k, v in sorted(other.value_counts().items())}


def unknown_label_warnings(unknown: dict[str, int], classes: list[str], folders: bool) -> list[str]:
    """One reason per unknown label: its image count, that they were checked for drift only, and the class
    it may mean (the same letters in another case, or with other spaces, '_' or '-')."""
    def fold(name: str) -> str:  # case, spaces, '_' and '-' only: a fuzzy match could suggest the opposite class
        return re.sub(r"[\s_-]+", "", name.casefold())  # (infected/ is one letter pair from Uninfected)

    folded = {fold(c): c for c in classes}
    out = []
    for label, n in unknown.items():
        near = folded.get(fold(label))
        fix = f"did you mean {near!r}? Rename it" if near else "rename it"
        out.append(f"{WARNING}{f'folder {label}/' if folders else f'label {label!r}'} ({n} image"
                   f"{'' if n == 1 else 's'}) is not a class of the model ({', '.join(classes)}), so its images were "
                   f"checked for drift but not for performance; {fix} to its class, or to "
                   f"{'unlabelled/' if folders else repr('unlabelled')} for images without a label")
    return out


class NoUsableImage(ValueError):
    """A batch whose every file was quarantined; ``reason`` says so in one line with the counts (``quarantined``)."""

    def __init__(self, message: str, reason: str, quarantined: int) -> None:
        super().__init__(message)
        self.reason, self.quarantined = reason, quarantined


def _no_usable_image(source: Path, ing: dict[str, Any], quarantine: pd.DataFrame,
                     classes: list[str]) -> NoUsableImage:
    """The error of a batch with no usable image: counts per reason, where images without a class folder
    must go, and the first quarantined files (no report and no quarantine.csv are written for it)."""
    reason = f"no usable image ({ing['reconciliation']})"
    hint = (f"; images must sit in a sub-folder of the batch: {source}/<class>/ for labelled images (classes: "
            f"{', '.join(classes)}), {source}/unlabelled/ for images without a label"
            if ing["format"] in ("folder", "dicom") and "no_label" in ing["by_reason"] else "")
    listed = "; ".join(f"{q.path} ({q.reason}: {q.detail})" for q in quarantine.head(5).itertuples())
    more = f"; and {len(quarantine) - 5} more" if len(quarantine) > 5 else ""
    return NoUsableImage(f"{source}: {reason}{hint}. No report was written; the quarantined files: {listed}{more}",
                         reason, int(ing["quarantined"]))


def _champion_test(record: dict[str, Any]) -> dict[str, Any]:
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


def _summary_widgets(summary: dict[str, Any]) -> list[Any]:
    """Evidently widgets for medflow's own sections: verdict, groups, features, batch vs champion."""
    from evidently.legacy.renderers.html_widgets import CounterData, counter, table_data

    drift, perf, cfg = summary["drift"], summary["performance"], monitor_config(summary["params"])
    uncorrected = f"p < {cfg.feature_alpha:.3g} (uncorrected)"
    groups, n = drift["groups"], drift["n_features"]
    widgets = [
        counter(title=f"Batch {summary['batch']} - champion {summary['champion']['version']}"
                      + (" - SIMULATED batch" if summary.get("simulated") else ""), counters=[
            CounterData("Verdict", summary["verdict"].upper()),
            CounterData("Images (quarantined)", f"{_count(summary['n_images'])} ({_count(summary['n_quarantined'])})"),
            CounterData("Drifted features (p-value below the group threshold)",
                        f"{_count(drift['drifted_count'])} of {_count(n)} ({drift['share']:.2f})"),
            CounterData(f"Features with {uncorrected}; broad weak shift at a share >= {cfg.drift_share:.3g}",
                        f"{_count(drift['below_feature_alpha_count'])} of {_count(n)} "
                        f"({drift['share_below_feature_alpha']:.2f})"),
            CounterData(f"Embedding drift (domain-classifier ROC AUC, 0.5 = no difference); drift at >= "
                        f"{cfg.embedding_auc:.3g}", f"{drift['embedding_auc']:.3f}"),
            CounterData("Accuracy (batch / champion test)",
                        f"{_fmt(perf['batch']['accuracy'])} / {_fmt(perf['champion_test'].get('accuracy'))}"
                        if perf else "no class labels (see the warning)" if summary.get("unknown_labels")
                        else "no labels")]),
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
        table_data(title="Per-feature drift tests (image statistics, embedding PCs, predictions): drifted = "
                         "p-value below the group threshold",
                   column_names=["feature", "group", "test", "p-value", "group threshold", "drifted", uncorrected,
                                 "counts toward verdict"],
                   data=[[c, v["group"], v["test"], f"{v['p_value']:.3g}", f"{groups[v['group']]['threshold']:.3g}",
                          _fmt(v["drifted"]), _fmt(v["below_feature_alpha"]),
                          _fmt(counts_toward_verdict(v, groups, drift["share_below_feature_alpha"], cfg))]
                         for c, v in drift["features"].items()]),
        table_data(title="Predicted classes (share: batch / reference)", column_names=["class", "batch", "reference"],
                   data=[[c, f"{b:.3f}", f"{summary['predictions']['reference_share'][c]:.3f}"]
                         for c, b in summary["predictions"]["batch_share"].items()]),
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
                                        "labelled)",
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
    how = ", ".join(f"{k} {sim[k]}" for k in ("shift", "strength", "seed") if sim.get(k) is not None)
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
        "no sign of a difference (Evidently's panels call the p-value \"drift score\").</p>"
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


def _page_head(page: str, summary: dict[str, Any]) -> str:
    """Add a <title> and, above Evidently's panels, a link back to the main report, an <h1> naming the batch
    and its verdict (colour and text), a SIMULATED banner when the batch is simulated and "How to read this
    page"."""
    batch, verdict = html.escape(summary["batch"]), summary["verdict"]
    fg, bg = _VERDICT_COLOURS[verdict]
    simulated = bool(summary.get("simulated"))
    sim_fg, sim_bg = "#4a148c", "#f3e5f5"
    badge = (f' <span class="simulated-badge" style="{_BADGE.format(fg=sim_fg, bg=sim_bg)};padding:0 8px">'
             "SIMULATED</span>"
             if simulated else "")
    head = (f'<header class="medflow-head" style="font-family:sans-serif;margin:16px 24px;max-width:72em">\n'
            f'<nav><a class="back" href="{MAIN_REPORT}">&larr; Back to the main report</a></nav>\n'
            f'<h1>medflow monitoring: {batch} - verdict <span class="verdict verdict-{verdict}" '
            f'style="{_BADGE.format(fg=fg, bg=bg)};padding:0 8px">{verdict.upper()}</span>{badge}</h1>\n'
            + (f'<p class="simulated" style="{_BADGE.format(fg=sim_fg, bg=sim_bg)};padding:8px">'
               f"{_simulated_note(summary)}</p>\n" if simulated else "")
            + "".join(f'<p class="warning" style="{_BADGE.format(fg="#7a4f01", bg="#fff3cd")};padding:8px">'
                      f"<strong>Warning:</strong> {html.escape(r.removeprefix(WARNING))}</p>\n"
                      for r in summary["reasons"] if r.startswith(WARNING))
            + f'<section class="how-to-read"><h2>How to read this page</h2>\n{how_to_read(summary)}</section>\n'
            "</header>")
    title = f"medflow monitoring: {batch} ({verdict})"
    page = page.replace("<head>", f"<head>\n<title>{title}</title>", 1)
    return re.sub(r'<body>(\s*<div id="root_)', lambda m: f"<body>\n{head}{m.group(1)}", page, count=1)


def render_report(summary: dict[str, Any], drift_snap: Any, cls_snap: Any | None) -> str:
    """One self-contained HTML page: medflow summary, Evidently drift report, Evidently classification report."""
    from evidently.core.metric_types import render_widgets
    from evidently.legacy.renderers.html_widgets import group_widget, header_text

    # Snapshot widgets are Evidently's own rendering of each report (what Snapshot.save_html renders).
    groups = [group_widget(title="Monitoring summary", widgets=_summary_widgets(summary)),
              group_widget(title="Drift per column (Evidently; its 'drift score' is the p-value): 'drift detected' "
                                 "when it is below the column's group threshold (Bonferroni, as the verdict)",
                           widgets=drift_snap._widgets)]
    if cls_snap is not None:
        positive = summary["performance"]["positive_class"]
        note = (f"Precision / recall / F1 are those of the positive class: {positive}" if positive else
                "No positive class: precision / recall / F1 per class (a single figure is a macro average)")
        groups.append(group_widget(title="Classification quality of the labelled batch (Evidently)",
                                   widgets=[header_text(label=note), *cls_snap._widgets]))
    page = _page_head(render_widgets(groups), summary)
    if external := external_references(page):
        raise RuntimeError(f"the report would load from the network: {external[:3]}")
    return page


def _append_history(path: Path, row: dict[str, Any]) -> None:
    """Append ``row``; a file written before a column of :data:`HISTORY_COLUMNS` existed is first rewritten
    with every column (its rows unchanged, the new columns blank), so each line has the header's fields."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    header = old.splitlines()[0].split(",") if old else list(HISTORY_COLUMNS)
    if old and not set(HISTORY_COLUMNS) <= set(header):
        earlier = pd.read_csv(path, dtype=str, keep_default_na=False)
        header = [*HISTORY_COLUMNS, *(c for c in earlier.columns if c not in HISTORY_COLUMNS)]
        old = earlier.reindex(columns=header, fill_value="").to_csv(index=False)
    atomic_write(path, old + pd.DataFrame([row], columns=header).to_csv(index=False, header=not old))


def record_failure(out_root: str | Path, batch: str, error: BaseException, location: str) -> None:
    """Append a ``failed`` line for ``batch``, which could not be checked, to ``out_root/history.csv``: the
    reason in one line (the error's first; for :class:`NoUsableImage` its counts, with 0 images and
    the quarantined count), ``location`` (where its files are now). Nothing else is written: no
    ``out_root/<batch>/`` folder takes the name."""
    if isinstance(error, NoUsableImage):
        reason, counts = error.reason, {"n_images": 0, "n_quarantined": error.quarantined}
    else:
        first_line = str(error).partition("\n")[0]
        reason, counts = f"{type(error).__name__}: {first_line}", {}
    row = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "batch": batch, "verdict": FAILED, **counts,
           "reasons": reason, "location": location}
    _append_history(Path(out_root) / "history.csv", row)


def monitor_batch(batch_source: str | Path, *, champion_json: str | Path, reference: ReferenceData,
                  out_root: str | Path, params: Params, name: str | None = None,
                  progress: bool = False) -> dict[str, Any]:
    """Monitor one batch (any source ``medflow ingest`` reads); return the summary written to summary.json."""
    from medflow.data.ingest import ingest
    from medflow.evaluate import positive_index

    cfg: MonitorConfig = monitor_config(params.monitor)
    batch_source, out_root = Path(batch_source), Path(out_root)
    name = free_name(name or batch_name(batch_source), out_root)  # history rows keep their earlier report
    champion = load_champion(champion_json)
    simulation = simulation_settings(batch_source)  # None: not made by `medflow simulate-batch`
    classes = champion.classes
    pos = positive_index(classes, params.evaluate.positive_class)
    positive = None if pos is None else classes[pos]
    ingest_cfg = params.ingest.model_copy(update={"image_size": int(champion.record["image_size"]),
                                                  "channels": int(champion.record["channels"])})
    # The batch's own format (a class-folder batch stays a folder when the training source is a CSV or npz).
    data_cfg = params.data.model_copy(update={"format": "auto"})
    with tempfile.TemporaryDirectory(prefix="medflow-monitor-") as tmp:
        ing = ingest(batch_source, tmp, data_cfg, ingest_cfg, progress=progress, warn_groups=False)  # never split
        tables = {f: (Path(tmp) / f).read_bytes() for f in ("quarantine.csv", "ingest_summary.json")}
        manifest = pd.read_csv(Path(tmp) / "manifest.csv", dtype={"id": str, "label": str, "path": str})
        if manifest.empty:
            quarantine = pd.read_csv(Path(tmp) / "quarantine.csv", dtype=str, keep_default_na=False)
            raise _no_usable_image(batch_source, ing, quarantine, classes)
        pixels = np.load(Path(tmp) / "pixels.npy")
        emb, proba = champion.outputs(model_inputs(manifest, pixels), cfg.batch_size)
    ref, projection, ref_cache = reference_features(champion, reference, out_root / "reference", cfg)
    current = feature_frame(manifest, emb, proba, projection, classes)
    pcs = pc_columns(len(projection.components))

    drift_snap = drift_snapshot(ref, current, pcs, cfg)
    values = drift_values(drift_snap, pcs, cfg)
    values["embedding_auc"] = embedding_auc(ref, current, pcs, cfg)
    groups = group_drift(values["features"], values["embedding_auc"], cfg)
    perf_batch = _performance(current, proba, champion.record, bins=params.evaluate.calibration_bins)
    champ_test = _champion_test(champion.record)
    labelled = current[current["label"].isin(classes)]
    cls_snap = classification_snapshot(labelled, classes, positive) if perf_batch else None
    quarantine_share = ing["quarantined"] / max(ing["found"], 1)
    verdict = decide(groups, values["share_below_feature_alpha"], perf_batch, champ_test, quarantine_share, cfg)
    unknown = unknown_labels(current["label"], classes)
    verdict["reasons"] += unknown_label_warnings(unknown, classes, folders=ing["format"] in ("folder", "dicom"))

    summary: dict[str, Any] = {
        "batch": name, "source": str(batch_source), "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "champion": {"model": champion.record.get("model"), "version": champion.version},
        "simulated": simulation is not None, "simulation": simulation,
        **verdict,
        "n_found": int(ing["found"]), "n_images": len(current), "n_quarantined": int(ing["quarantined"]),
        "quarantine_share": quarantine_share, "quarantine_by_reason": ing.get("by_reason", {}),
        "unknown_labels": unknown,
        "drift": {"share": values["drift_share"], "drifted_count": values["drifted_count"],
                  "share_below_feature_alpha": values["share_below_feature_alpha"],
                  "below_feature_alpha_count": values["below_feature_alpha_count"],
                  "n_features": len(values["features"]), "embedding_auc": values["embedding_auc"],
                  "groups": groups, "features": values["features"]},
        "predictions": {
            "batch_share": {c: float((current["prediction"] == c).mean()) for c in classes},
            "reference_share": {c: float((ref["prediction"] == c).mean()) for c in classes},
            "mean_confidence": {"batch": float(current["confidence"].mean()), "reference": float(ref["confidence"].mean())},
        },
        "performance": None if perf_batch is None else {
            "batch": perf_batch, "positive_class": positive, "champion_test": champ_test},
        "reference": {"rows": len(ref), "cache": str(ref_cache)},
        "params": cfg.model_dump(),
        "report": "report.html",
    }
    page = render_report(summary, drift_snap, cls_snap)
    batch_dir = out_root / name  # written only now: a batch that could not be checked leaves nothing behind
    for f, data in tables.items():
        atomic_write(batch_dir / f, data)
    atomic_write(batch_dir / "report.html", page)
    atomic_write_json(batch_dir / "summary.json", summary)
    preds = current[["id", "label", "prediction", "confidence"]].copy()
    atomic_write(batch_dir / "predictions.csv", preds.to_csv(index=False))
    _append_history(out_root / "history.csv", {
        "time": summary["time"], "batch": name, "verdict": summary["verdict"], "n_images": summary["n_images"],
        "n_quarantined": summary["n_quarantined"], "drift_share": round(values["drift_share"], 4),
        "drifted_groups": " ".join(g for g, v in groups.items() if v["drifted"]),
        "embedding_auc": values["embedding_auc"],
        "accuracy": perf_batch["accuracy"] if perf_batch else None,
        "macro_f1": perf_batch["macro_f1"] if perf_batch else None,
        "champion_version": champion.version, "reasons": "; ".join(summary["reasons"]),
        "report": f"{name}/report.html", "summary": f"{name}/summary.json", "simulated": summary["simulated"]})
    return summary


def monitoring_index(monitoring_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per monitored batch run (oldest first): batch, time, verdict (:data:`FAILED` for a batch that
    could not be checked), drift_share (share of drifted features), accuracy, macro_f1, champion_version (the
    model checked), reasons, ``simulated`` (True / False; None for a line written before medflow recorded it or
    of a failed batch), ``report`` (path relative to ``monitoring_dir``; None for a failed batch) and
    ``location`` (where a failed batch's files are); [] when nothing was monitored."""
    path = Path(monitoring_dir) / "history.csv"
    if not path.is_file():
        return []
    df = pd.read_csv(path, dtype={"batch": str, "reasons": str, "simulated": str}, keep_default_na=False,
                     na_values=[""])
    df = df.astype(object).where(df.notna(), None)
    keys = ["batch", "time", "verdict", "drift_share", "accuracy", "macro_f1", "champion_version", "reasons",
            "simulated", "report", "location"]
    flags = {"true": True, "false": False}
    rows = [{k: row.get(k) for k in keys} for row in df.to_dict("records")]  # older files may lack columns
    for r in rows:
        r["simulated"] = flags.get(str(r["simulated"]).strip().lower()) if r["simulated"] is not None else None
    return rows
