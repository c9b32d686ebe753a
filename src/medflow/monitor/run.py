"""The monitoring stage: ingest a batch, predict with the champion, Evidently drift + classification report,
verdict; writes ``out_root/<batch>/{report.html, summary.json, predictions.csv, quarantine.csv,
ingest_summary.json}`` and appends a line to ``out_root/history.csv``.

Images in a folder that is not one of the champion's classes (e.g. ``batch/unlabelled/``) are monitored
for drift without a performance check.
"""

from __future__ import annotations

import html
import re
import shutil
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
from medflow.monitor.verdict import counts_toward_verdict, decide, group_drift

HISTORY_COLUMNS = ["time", "batch", "verdict", "n_images", "n_quarantined", "drift_share", "drifted_groups",
                   "embedding_auc", "accuracy", "macro_f1", "champion_version", "reasons", "report", "summary"]
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


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def _summary_widgets(summary: dict[str, Any]) -> list[Any]:
    """Evidently widgets for medflow's own sections: verdict, groups, features, batch vs champion."""
    from evidently.legacy.renderers.html_widgets import CounterData, counter, table_data

    drift, perf, cfg = summary["drift"], summary["performance"], monitor_config(summary["params"])
    uncorrected = f"p < {cfg.feature_alpha:.3g} (uncorrected)"
    groups = drift["groups"]
    widgets = [
        counter(title=f"Batch {summary['batch']} - champion {summary['champion']['version']}", counters=[
            CounterData("Verdict", summary["verdict"].upper()),
            CounterData("Images (quarantined)", f"{summary['n_images']} ({summary['n_quarantined']})"),
            CounterData(f"Drifted feature share, {uncorrected}; drift at >= {cfg.drift_share:.3g}",
                        f"{drift['share']:.2f}"),
            CounterData(f"Embedding drift (domain-classifier ROC AUC); drift at >= {cfg.embedding_auc:.3g}",
                        f"{drift['embedding_auc']:.3f}"),
            CounterData("Accuracy (batch / champion test)",
                        f"{_fmt(perf['batch']['accuracy'])} / {_fmt(perf['champion_test'].get('accuracy'))}"
                        if perf else "no labels")]),
        table_data(title="Verdict reasons", column_names=["reason"],
                   data=[[r] for r in summary["reasons"]] or [["no drift, no degradation"]]),
        table_data(title=f"Drift by group (Bonferroni within each group: threshold = family_alpha "
                         f"{cfg.family_alpha:.3g} / tests; embeddings also at ROC AUC >= {cfg.embedding_auc:.3g})",
                   column_names=["group", "tests", "min p-value", "threshold", "ROC AUC", "drifted",
                                 "features below threshold", f"features {uncorrected}"],
                   data=[[g, v["tests"], f"{v['min_p']:.3g}", f"{v['threshold']:.3g}", _fmt(v.get("auc")),
                          v["drifted"], ", ".join(v["significant_features"]), ", ".join(v["drifted_features"])]
                         for g, v in groups.items()]),
        table_data(title="Per-feature drift tests (image statistics, embedding PCs, predictions)",
                   column_names=["feature", "group", "test", "p-value", uncorrected, "group threshold",
                                 "counts toward verdict"],
                   data=[[c, v["group"], v["test"], f"{v['p_value']:.3g}", v["drifted"],
                          f"{groups[v['group']]['threshold']:.3g}",
                          counts_toward_verdict(v, groups, drift["share"], cfg)]
                         for c, v in drift["features"].items()]),
        table_data(title="Predicted classes (share: batch / reference)", column_names=["class", "batch", "reference"],
                   data=[[c, f"{b:.3f}", f"{summary['predictions']['reference_share'][c]:.3f}"]
                         for c, b in summary["predictions"]["batch_share"].items()]),
    ]
    if perf:
        tol = cfg.degradation_tolerance
        widgets.append(table_data(
            title=f"Batch vs champion test ({perf['batch']['n']} labelled; degraded when a verdict metric falls "
                  f"more than {tol:.3g} below the champion's, needs >= {cfg.min_labelled} labelled)",
            column_names=["metric", "batch", "champion test", "degraded below", "counts toward verdict"],
            data=[[k, _fmt(perf["batch"][k]), _fmt(c := perf["champion_test"].get(k)),
                   _fmt(None if c is None else c - tol), k in cfg.degradation_metrics]
                  for k in ("accuracy", "balanced_accuracy", "macro_f1", "qwk") if perf["batch"].get(k) is not None]))
        champ = perf["champion_test"].get("per_class", {})
        rows = []
        for c, v in perf["batch"]["per_class"].items():
            ch = champ.get(c, {})
            rows.append([c] + [f"{_fmt(v[k])} / {_fmt(ch.get(k))}" for k in ("precision", "recall", "f1")]
                        + [v["support"]])
        widgets.append(table_data(title=f"Per-class performance, batch / champion test ({perf['batch']['n']} labelled)",
                                  column_names=["class", "precision", "recall", "F1", "batch support"], data=rows))
    return widgets


_VERDICT_COLOURS = {"ok": ("#1b5e20", "#e8f5e9"), "drift": ("#7a4f01", "#fff3cd"), "degraded": ("#8b0000", "#fde2e2")}


def _page_head(page: str, summary: dict[str, Any]) -> str:
    """Add a <title> and an <h1> naming the batch and its verdict (colour and text) to Evidently's page."""
    batch, verdict = html.escape(summary["batch"]), summary["verdict"]
    fg, bg = _VERDICT_COLOURS[verdict]
    h1 = (f'<h1 style="font-family:sans-serif;margin:16px 24px">medflow monitoring: {batch} - verdict '
          f'<span class="verdict verdict-{verdict}" style="color:{fg};background:{bg};border:2px solid {fg};'
          f'border-radius:4px;padding:0 8px">{verdict.upper()}</span></h1>')
    page = page.replace("<head>", f"<head>\n<title>medflow monitoring: {batch}</title>", 1)
    return re.sub(r'<body>(\s*<div id="root_)', lambda m: f"<body>\n{h1}{m.group(1)}", page, count=1)


def render_report(summary: dict[str, Any], drift_snap: Any, cls_snap: Any | None) -> str:
    """One self-contained HTML page: medflow summary, Evidently drift report, Evidently classification report."""
    from evidently.core.metric_types import render_widgets
    from evidently.legacy.renderers.html_widgets import group_widget, header_text

    # Snapshot widgets are Evidently's own rendering of each report (what Snapshot.save_html renders).
    groups = [group_widget(title="Monitoring summary", widgets=_summary_widgets(summary)),
              group_widget(title="Drift per column (Evidently): 'drift detected' at the column's group threshold "
                                 "(Bonferroni, as the verdict)", widgets=drift_snap._widgets)]
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
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    atomic_write(path, old + pd.DataFrame([row], columns=HISTORY_COLUMNS).to_csv(index=False, header=not old))


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
    classes = champion.classes
    pos = positive_index(classes, params.evaluate.positive_class)
    positive = None if pos is None else classes[pos]
    ref, projection, ref_cache = reference_features(champion, reference, out_root / "reference", cfg)
    batch_dir = out_root / name
    batch_dir.mkdir(parents=True, exist_ok=True)
    ingest_cfg = params.ingest.model_copy(update={"image_size": int(champion.record["image_size"]),
                                                  "channels": int(champion.record["channels"])})
    # The batch's own format (a class-folder batch stays a folder when the training source is a CSV or npz).
    data_cfg = params.data.model_copy(update={"format": "auto"})
    with tempfile.TemporaryDirectory(prefix="medflow-monitor-") as tmp:
        ing = ingest(batch_source, tmp, data_cfg, ingest_cfg, progress=progress)
        for f in ("quarantine.csv", "ingest_summary.json"):
            shutil.copyfile(Path(tmp) / f, batch_dir / f)
        manifest = pd.read_csv(Path(tmp) / "manifest.csv", dtype={"id": str, "label": str, "path": str})
        if manifest.empty:
            raise ValueError(f"{batch_source}: no usable image (all {ing['found']} quarantined, see "
                             f"{batch_dir / 'quarantine.csv'})")
        pixels = np.load(Path(tmp) / "pixels.npy")
        emb, proba = champion.outputs(model_inputs(manifest, pixels), cfg.batch_size)
    current = feature_frame(manifest, emb, proba, projection, classes)
    pcs = pc_columns(len(projection.components))

    drift_snap = drift_snapshot(ref, current, pcs, cfg)
    values = drift_values(drift_snap, pcs, cfg)
    values["embedding_auc"] = embedding_auc(ref, current, pcs, cfg)
    groups = group_drift(values["features"], values["embedding_auc"], cfg)
    perf_batch = _performance(current, proba, champion.record, bins=params.evaluate.calibration_bins)
    champ_metrics = champion.record.get("metrics", {})
    labelled = current[current["label"].isin(classes)]
    cls_snap = classification_snapshot(labelled, classes, positive) if perf_batch else None
    quarantine_share = ing["quarantined"] / max(ing["found"], 1)
    verdict = decide(groups, values["drift_share"], perf_batch, champ_metrics, quarantine_share, cfg)

    summary: dict[str, Any] = {
        "batch": name, "source": str(batch_source), "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "champion": {"model": champion.record.get("model"), "version": champion.version},
        **verdict,
        "n_found": int(ing["found"]), "n_images": len(current), "n_quarantined": int(ing["quarantined"]),
        "quarantine_share": quarantine_share, "quarantine_by_reason": ing.get("by_reason", {}),
        "drift": {"share": values["drift_share"], "drifted_count": values["drifted_count"],
                  "n_features": len(values["features"]), "embedding_auc": values["embedding_auc"],
                  "groups": groups, "features": values["features"]},
        "predictions": {
            "batch_share": {c: float((current["prediction"] == c).mean()) for c in classes},
            "reference_share": {c: float((ref["prediction"] == c).mean()) for c in classes},
            "mean_confidence": {"batch": float(current["confidence"].mean()), "reference": float(ref["confidence"].mean())},
        },
        "performance": None if perf_batch is None else {
            "batch": perf_batch, "positive_class": positive,
            "champion_test": {k: champ_metrics.get(k) for k in ("n", "accuracy", "balanced_accuracy", "macro_f1",
                                                                 "qwk", "per_class") if k in champ_metrics}},
        "reference": {"rows": len(ref), "cache": str(ref_cache)},
        "params": cfg.model_dump(),
        "report": "report.html",
    }
    atomic_write(batch_dir / "report.html", render_report(summary, drift_snap, cls_snap))
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
        "report": f"{name}/report.html", "summary": f"{name}/summary.json"})
    return summary


def monitoring_index(monitoring_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per monitored batch run (oldest first): batch, time, verdict, drift_share, accuracy,
    macro_f1, reasons and ``report`` (path relative to ``monitoring_dir``); [] when nothing was monitored."""
    path = Path(monitoring_dir) / "history.csv"
    if not path.is_file():
        return []
    df = pd.read_csv(path, dtype={"batch": str, "reasons": str}, keep_default_na=False, na_values=[""])
    df = df.astype(object).where(df.notna(), None)
    keys = ["batch", "time", "verdict", "drift_share", "accuracy", "macro_f1", "reasons", "report"]
    return [{k: row.get(k) for k in keys} for row in df.to_dict("records")]  # older files may lack columns
