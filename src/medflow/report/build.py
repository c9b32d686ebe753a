"""Build ``reports/index.html``: one self-contained, offline page from the stage outputs.

Reads files only (no model is loaded or trained). Every missing input becomes a section saying
which command produces it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from medflow.data.manifest import SPLITS
from medflow.io import atomic_write
from medflow.layout import Layout
from medflow.promote import LAST_DECISION, PRODUCTION, load_registry
from medflow.report import figures

METRIC_LABELS = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "macro_f1": "Macro F1",
    "roc_auc": "ROC-AUC",
    "qwk": "Quadratic weighted kappa",
    "ece": "Calibration error (ECE)",
}
COLUMN_LABELS = {**METRIC_LABELS, "num_params": "Parameters", "n_test": "Test images", "champion": "Champion",
                 "rank": "Rank", "model": "Model"}
FACT_LABELS = {"found": "image files found", "accepted": "images accepted (used)",
               "quarantined": "files quarantined (set aside)", "groups": "patients/slides (groups)",
               "ungrouped": "images without a patient/slide id"}
VALIDATION_LABELS = {"statistics.evaluated": "checks run", "statistics.failed": "checks failed",
                     "statistics.successful": "checks passed", "source": "data source",
                     "manifest": "image list (manifest)", "rows": "images in the image list",
                     "duplicate_hashes": "exact duplicate images (kept in one split)",
                     "quarantine_share": "quarantined files (share of files found)"}
CHECK_COLUMNS = {"description": "check", "table": "table", "column": "column", "severity": "severity",
                 "success": "passed", "observed": "observed", "offending_count": "failing rows",
                 "expectation": "rule (Great Expectations)"}
SPLIT_LABELS = {"train": "training", "val": "validation", "test": "test", "total": "total"}
PER_CLASS_LABELS = {"f1": "F1", "support": "test images"}


def _json(path: Path) -> Any | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _png(path: Path) -> str | None:
    return figures.data_uri(path.read_bytes()) if path.is_file() else None


def _cell(v: Any) -> Any:
    """Display form of one value: 3 decimals for fractions, thousands separators for large counts, lists joined,
    booleans as yes/no, blanks for missing."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "" if pd.isna(v) else f"{v:,.0f}" if v.is_integer() and abs(v) >= 1000 else f"{v:.3f}"
    if isinstance(v, (int, np.integer)) and abs(v) >= 10000:  # 3,415,593 parameters; years and small counts stay plain
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(_cell(x)) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_cell(x)}" for k, x in v.items())
    return "" if v is None or (not isinstance(v, str) and pd.isna(v)) else v


def _table(df: pd.DataFrame, max_rows: int = 200, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A DataFrame as {columns, rows, numeric, nowrap} for display (see :func:`_cell`); ``labels`` rename columns;
    ``numeric`` flags the columns to right-align, ``nowrap`` those kept on one line (intervals ``lo – hi``, times),
    ``long`` those of sentences, kept wide enough to read when the table scrolls on a narrow screen."""
    df = df.head(max_rows)
    rows = [[_cell(v) for v in r] for r in df.itertuples(index=False)]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    return {"columns": [(labels or {}).get(str(c), str(c)) for c in df.columns], "rows": rows, "numeric": numeric,
            "nowrap": [str(c).endswith("interval") or str(c) in {"time", "batch"} for c in df.columns],
            "long": [str(c) in {"reasons", "observed", "description"} for c in df.columns]}


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _span(ci: Sequence[float] | None) -> str:
    """``lo – hi`` of a 95% interval; empty when there is none."""
    return " – ".join(_fmt(float(x)) for x in ci) if ci else ""


def _still_improving(train: dict[str, Any] | None) -> bool:
    """Training ran out of epochs with its best validation loss at the last one: more epochs may help."""
    return bool(train) and not train.get("stopped_early") and train.get("best_epoch") == train.get("epochs_run")


def _operating_point(details: dict[str, Any], positive: str | None) -> dict[str, Any] | None:
    """Sensitivity and specificity of a two-class model at its decision rule (the more probable class) for
    ``evaluate.positive_class``: hits, totals, values and 95% intervals (the per-class recall resamples)."""
    classes, confusion = details.get("classes") or [], details.get("confusion")
    if positive not in classes or len(classes) != 2 or not confusion:
        return None
    i = classes.index(positive)
    ci = details.get("per_class_ci95") or {}

    def found(k: int) -> dict[str, Any]:
        total = int(sum(confusion[k]))
        return {"cls": classes[k], "hits": int(confusion[k][k]), "total": total,
                "value": _fmt(confusion[k][k] / total) if total else "n/a",
                "ci": _span((ci.get(classes[k]) or {}).get("recall"))}

    return {"sensitivity": found(i), "specificity": found(1 - i)}


def _data_section(layout: Layout) -> dict[str, Any] | None:
    s = _json(layout.ingest_summary)
    if s is None:
        return None
    per_class = pd.DataFrame(sorted((s.get("per_class") or {}).items()), columns=["class", "images"])
    reasons = pd.DataFrame(sorted((s.get("by_reason") or {}).items()), columns=["reason", "files"])
    facts = {k: s.get(k) for k in ("found", "accepted", "quarantined", "groups", "ungrouped") if k in s}
    return {
        "facts": facts,
        "fact_rows": [(FACT_LABELS.get(k, k), v) for k, v in facts.items()],
        "per_class": _table(per_class),
        "reasons": _table(reasons) if len(reasons) else None,
        "chart": figures.data_uri(figures.grouped_bars(per_class, "images")) if len(per_class) else None,
    }


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys (lists are left as they are)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _validation_section(layout: Layout) -> dict[str, Any] | None:
    v = _json(layout.validation_dir / "validation.json")
    if v is None:
        return None
    scalars = {_validation_label(k): f"{val:.1%}" if k == "quarantine_share" and isinstance(val, float) else val
               for k, val in _flatten(v).items()
               if k != "success" and (isinstance(val, (str, int, float, bool)) or val is None)}
    tables = {}
    for k, val in v.items():
        if isinstance(val, list) and val and all(isinstance(x, dict) for x in val):
            df = pd.DataFrame(val).drop(columns=["kwargs", "offending"], errors="ignore")  # in the full report
            # what was checked and whether it passed first; the rule's internal name last
            df = df[[c for c in CHECK_COLUMNS if c in df and c != "expectation"]
                    + [c for c in df.columns if c not in CHECK_COLUMNS] + [c for c in ("expectation",) if c in df]]
            tables["checks" if k == "results" else k] = _table(df, labels=CHECK_COLUMNS)
    html = layout.validation_dir / "validation.html"
    return {"status": v.get("success"), "scalars": scalars, "tables": tables,
            "link": os.path.relpath(html, layout.report.parent) if html.is_file() else None}


def _validation_label(key: str) -> str:
    """Readable name of a dotted validation.json key (``classes.X``: images of class X)."""
    if key in VALIDATION_LABELS:
        return VALIDATION_LABELS[key]
    if key.startswith("classes."):
        return f"images of class {key.removeprefix('classes.')}"
    return key.replace("statistics.", "checks ").replace("_", " ")


def _wide_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Split counts as class rows × split columns (accepts long class,split,count tables too)."""
    cols = {c.lower(): c for c in df.columns}
    if "split" in cols and len(df.columns) == 3:
        cls = next(c for c in df.columns if c != cols["split"] and df[c].dtype == object)
        num = next(c for c in df.columns if c not in (cols["split"], cls))
        df = df.pivot_table(index=cls, columns=cols["split"], values=num, aggfunc="sum", fill_value=0)
        df = df[sorted(df.columns, key=lambda c: (SPLITS.index(c) if c in SPLITS else len(SPLITS), str(c)))]
        df = df.reset_index().rename_axis(columns=None)
    return df


def _splits_section(layout: Layout) -> dict[str, Any] | None:
    df = _csv(layout.split_counts)
    if df is None or df.empty:
        return None
    wide = _wide_counts(df)
    plot = wide[~wide.iloc[:, 0].astype(str).str.lower().isin({"total", "all"})]
    plot = plot.drop(columns=[c for c in plot.columns[1:] if str(c).lower() in {"total", "all"}])
    labels = {str(wide.columns[0]): "class", **SPLIT_LABELS}
    val = next((c for c in plot.columns[1:] if str(c).lower() in {"val", "validation"}), None)
    return {"table": _table(wide, labels=labels),
            "chart": figures.data_uri(figures.grouped_bars(plot.rename(columns=labels), "images")),
            "n_val": int(plot[val].sum()) if val is not None and pd.api.types.is_numeric_dtype(plot[val]) else None}


def _model_names(layout: Layout, params: Any) -> list[str]:
    """Models with a section: ranked ones first, in the comparison's order (champion first), then the others."""
    found = sorted(p.stem for p in (layout.root / "reports" / "metrics").glob("*.json"))
    ranked = _csv(layout.comparison)
    ranked = [str(m) for m in ranked["model"]] if ranked is not None and "model" in ranked else []
    return list(dict.fromkeys([*ranked, *params.active_models, *found]))


def _model_section(layout: Layout, name: str, positive: str | None = None) -> dict[str, Any]:
    ev = layout.eval_dir(name)
    history = _csv(layout.model_dir(name) / "history.csv")
    details = _json(ev / "details.json")
    roc_pts = _csv(ev / "roc.csv")
    calib = _csv(ev / "calibration.csv")
    mis = _csv(ev / "misclassified.csv")
    out: dict[str, Any] = {"name": name, "train": _json(layout.model_dir(name) / "train_summary.json")}
    kept = (out["train"] or {}).get("kept_epoch")
    out["curves"] = (figures.data_uri(figures.learning_curves(history, kept))
                     if history is not None and len(history) else None)
    if out["train"]:
        out["input_size"] = out["train"].get("input_size")
    out["still_improving"] = _still_improving(out["train"])
    if details is not None:
        ci = details.get("ci95", {})
        out["ci_unit"], out["ci_units"] = details.get("ci_unit", "images"), details.get("ci_units", details.get("n"))
        out["metrics"] = [
            {"label": METRIC_LABELS[k], "value": _fmt(details[k]),
             "ci": _span(ci.get(k))}
            for k in METRIC_LABELS if k in details
        ]
        out["n"] = details.get("n")
        out["confusion"] = figures.data_uri(figures.confusion(details["confusion"], details["classes"]))
        out["confusion_text"] = "; ".join(f"true {a}: " + ", ".join(f"{n} called {b}" for b, n in zip(
            details["classes"], row)) for a, row in zip(details["classes"], details["confusion"]))
        per_class = pd.DataFrame.from_dict(details["per_class"], orient="index")
        if pci := details.get("per_class_ci95"):
            for stat in ("precision", "recall"):
                per_class.insert(int(per_class.columns.get_loc(stat)) + 1, f"{stat} 95% interval",
                                 [_span((pci.get(c) or {}).get(stat)) for c in per_class.index])
        per_class = per_class.rename_axis("class").reset_index()
        out["per_class"] = _table(per_class, labels=PER_CLASS_LABELS)
        out["wrong"] = int(sum(map(sum, details["confusion"])) - sum(r[i] for i, r in enumerate(details["confusion"])))
        out["reliability"] = (figures.data_uri(figures.reliability(calib, len(details["classes"])))
                              if calib is not None else None)
        out["roc_classes"] = [] if roc_pts is None or not len(roc_pts) else list(roc_pts["class"].unique())
        out["auc"] = _fmt(details["roc_auc"]) if isinstance(details.get("roc_auc"), float) else None
        op = _operating_point(details, positive)
        rates = (1 - op["specificity"]["hits"] / op["specificity"]["total"], op["sensitivity"]["hits"] /
                 op["sensitivity"]["total"]) if op and op["sensitivity"]["total"] and op["specificity"]["total"] else None
        out["operating_point"] = rates is not None and out["roc_classes"] == [positive]
        out["roc"] = (figures.data_uri(figures.roc(roc_pts, details.get("roc_auc"),
                                                   rates if out["operating_point"] else None))
                      if out["roc_classes"] else None)
    out["misclassified"] = None if mis is None else {
        "count": len(mis), "image": _png(ev / "misclassified.png"),
        "table": _table(mis, labels={"id": "image", "label": "true class", "pred": "model's answer",
                                     "confidence": "model's confidence"})}
    out["gradcam"] = _png(ev / "gradcam.png")
    return out


def _comparison_section(layout: Layout, positive: str | None = None) -> dict[str, Any] | None:
    df = _csv(layout.comparison)
    if df is None:
        return None
    champ = _json(layout.champion)
    metric = champ["metric"] if champ else None
    ci: dict[str, list[float] | None] = {}
    if metric and metric in df:  # each model's interval of the ranking metric, beside its value
        ci = {m: ((_json(layout.eval_dir(m) / "details.json") or {}).get("ci95") or {}).get(metric)
              for m in df["model"]}
        df.insert(int(df.columns.get_loc(metric)) + 1, f"{metric} 95% interval",
                  [_span(ci[m]) for m in df["model"]])
    if champ is not None:
        runner = champ.get("runner_up") or {}
        mine = ci.get(champ["model"])
        train = _json(layout.model_dir(champ["model"]) / "train_summary.json") or {}
        details = _json(layout.eval_dir(champ["model"]) / "details.json") or {}
        champ = {**champ, "metric_label": METRIC_LABELS.get(metric, metric),
                 "value": _fmt(champ["metrics"].get(metric)),
                 "ci": _span(mine),
                 # models whose interval of the ranking metric overlaps the champion's: not shown to be worse
                 "overlap": [m for m, other in ci.items() if m != champ["model"] and mine and other
                             and other[0] <= mine[1] and other[1] >= mine[0]],
                 "still_improving": _still_improving(train),
                 "epochs": train.get("epochs_run"),
                 "operating_point": _operating_point(details, positive),
                 # the test set the figures come from: images, and patients/slides when resampled by group
                 "n_test": details.get("n"),
                 "n_groups": details.get("ci_units") if details.get("ci_unit") == "groups" else None,
                 "direction": "lowest" if metric == "ece" else "highest",
                 "created": _utc(champ.get("created")),
                 "runner_up": runner if runner.get("ci95") else None}
    labels = COLUMN_LABELS | ({f"{metric} 95% interval": f"{METRIC_LABELS.get(metric, metric)} 95% interval"}
                              if metric else {})
    return {"table": _table(df, labels=labels), "champion": champ}


def _deployment_section(layout: Layout) -> dict[str, Any] | None:
    """The deployed model (``models/production``) and what became of this run's champion, None when nothing is
    deployed. ``status``: ``same`` (the champion is deployed), ``refused`` (the promotion rule said no, ``reason``
    from its last decision), ``replaced`` (deployed earlier, not now) or ``undecided`` (not through the rule yet)."""
    deployed = _json(layout.root / PRODUCTION / "champion.json")
    if deployed is None:
        return None
    champ, reg = _json(layout.champion) or {}, load_registry(layout.root)
    version, metric = champ.get("version"), champ.get("metric", deployed["metric"])
    last = _json(layout.root / LAST_DECISION) or {}
    decision = last["decision"] if version and last.get("candidate") == version else {}
    refused = decision.get("promote") is False
    status = ("same" if version == deployed["version"] else "refused" if refused
              else "replaced" if any(v["version"] == version for v in reg["versions"]) else "undecided")
    event = next((h for h in reversed(reg["history"]) if h["version"] == deployed["version"]), {})
    how = event.get("reason") or (f"rollback from {event['from']}" if event.get("from") else "")
    return {"model": deployed["model"], "version": deployed["version"], "status": status,
            "metric_label": METRIC_LABELS.get(metric, metric), "value": _fmt(deployed["metrics"].get(metric)),
            "at": event.get("at", "")[:10], "how": how, "reason": decision.get("reason") if refused else None}


def _utc(stamp: Any) -> Any:
    """``2026-11-21T10:18:08+00:00`` -> ``2026-11-21 10:18`` (UTC); anything unparseable as it is."""
    try:
        t = pd.Timestamp(stamp)
    except (TypeError, ValueError):
        return stamp
    if pd.isna(t):
        return stamp
    return (t.tz_convert("UTC") if t.tzinfo else t).strftime("%Y-%m-%d %H:%M")


def _monitoring_section(layout: Layout) -> dict[str, Any] | None:
    """The monitoring history as a table; a batch that could not be checked is a ``failed`` row (red) whose
    verdict says so and whose reasons add where its files are; its other columns stay blank."""
    from medflow.monitor.run import FAILED, monitoring_index

    rows = monitoring_index(layout.monitoring)
    if not rows:
        return None
    rel = os.path.relpath(layout.monitoring, layout.report.parent)
    links = [(str(r["batch"]), f"{rel}/{r['report']}") for r in rows if r.get("report")]
    labels = {"batch": "Batch", "time": "Time (UTC)", "verdict": "Verdict", "n_images": "Images",
              "drift_share": "Drifted share of features", "accuracy": "Accuracy", "macro_f1": "Macro F1",
              "champion_version": "Model checked", "reasons": "Reasons", "simulated": "Simulated batch"}
    in_use = layout.deployed_champion
    current = (_json(in_use) or {}).get("version")
    model = "the current champion" if in_use == layout.champion else "the deployed model"
    failed = [r["verdict"] == FAILED for r in rows]
    for r, fail in zip(rows, failed):
        r["time"] = _utc(r.get("time"))
        if r.get("simulated") is None and not fail:
            r["simulated"] = "not recorded"  # a line written before medflow recorded it
        if fail:
            r["verdict"], r["reasons"] = "could not be checked", f"{r['reasons']}; {r['location']}"
        elif r.get("champion_version") and current and r["champion_version"] != current:
            # a batch checked against another model says so: its figures are not the model in use
            r["champion_version"] = f"{r['champion_version']} (not {model})"
    df = pd.DataFrame(rows).drop(columns=["report", "location"])
    df["n_images"] = pd.array([None if f else r["n_images"] for f, r in zip(failed, rows)], dtype="Int64")
    table = _table(df, labels=labels)
    return {"table": {**table, "row_classes": ["failed" if f else "" for f in failed]}, "links": links,
            "model": model, "failed": any(failed)}


def build_report(layout: Layout, params: Any) -> Path:
    """Render ``layout.report`` (reports/index.html) and return its path."""
    env = Environment(loader=PackageLoader("medflow.report", "templates"), autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        params=params,
        data=_data_section(layout),
        validation=_validation_section(layout),
        splits=_splits_section(layout),
        comparison=_comparison_section(layout, params.evaluate.positive_class),
        deployment=_deployment_section(layout),
        models=[_model_section(layout, n, params.evaluate.positive_class) for n in _model_names(layout, params)],
        monitoring=_monitoring_section(layout),
        metric_labels=METRIC_LABELS,
    )
    return atomic_write(layout.report, html)
