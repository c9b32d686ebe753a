"""The monitoring stage: ingest a batch, predict with the champion, Evidently drift + classification report,
verdict; writes ``out_root/<batch>/{report.html, summary.json, predictions.csv, quarantine.csv,
ingest_summary.json}`` and appends a line to ``out_root/history.csv``. The page is drawn by
:mod:`medflow.monitor.page`.

Images in a folder that is not one of the champion's classes are monitored for drift without a performance
check: ``batch/unlabelled/`` (:data:`UNLABELLED`) quietly, any other (``Babesia/``, ``parasitized/`` for
``Parasitized``) with a warning in the reasons, on the page and as ``unknown_labels`` in summary.json. A batch
that cannot be checked (no image, none usable: :class:`NoUsableImage`) raises and leaves nothing under
``out_root``; the monitoring flow then records it with :func:`record_failure` (a ``failed`` line in history.csv,
no folder, so the fixed batch gets its name back).
"""

from __future__ import annotations

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
    IMAGE_FEATURES,
    ReferenceData,
    feature_frame,
    load_champion,
    model_inputs,
    pc_columns,
    reference_features,
)
from medflow.monitor.page import champion_test, render_report
from medflow.monitor.simulate import simulation_settings
from medflow.monitor.verdict import (
    WARNING,
    decide,
    group_drift,
)

# New columns go at the end; a history.csv written before them is rewritten with them (blank) on the next line.
# ``location``: where the files of a batch that could not be checked are now (blank on other lines).
HISTORY_COLUMNS = ["time", "batch", "verdict", "n_images", "n_quarantined", "drift_share", "drifted_groups",
                   "embedding_auc", "accuracy", "macro_f1", "champion_version", "reasons", "report", "summary",
                   "simulated", "location"]
FAILED = "failed"  # the history verdict of a batch that could not be checked (see record_failure)
UNLABELLED = ("unlabelled", "unlabeled")  # folder (or label) names, any case, of images without a label
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
    champ_test = champion_test(champion.record)
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
                  "groups": groups, "features": values["features"],
                  # the page says which way a feature moved (not used by the verdict)
                  "medians": {c: {"batch": float(current[c].median()), "reference": float(ref[c].median())}
                              for c in [*IMAGE_FEATURES, *pcs, "confidence"]}},
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
    could not be checked), n_images (int; None when not recorded), drift_share (share of drifted features), accuracy, macro_f1, champion_version (the
    model checked), reasons, ``simulated`` (True / False; None for a line written before medflow recorded it or
    of a failed batch), ``report`` (path relative to ``monitoring_dir``; None for a failed batch) and
    ``location`` (where a failed batch's files are); [] when nothing was monitored."""
    path = Path(monitoring_dir) / "history.csv"
    if not path.is_file():
        return []
    df = pd.read_csv(path, dtype={"batch": str, "reasons": str, "simulated": str}, keep_default_na=False,
                     na_values=[""])
    df = df.astype(object).where(df.notna(), None)
    keys = ["batch", "time", "verdict", "n_images", "drift_share", "accuracy", "macro_f1", "champion_version", "reasons",
            "simulated", "report", "location"]
    flags = {"true": True, "false": False}
    rows = [{k: row.get(k) for k in keys} for row in df.to_dict("records")]  # older files may lack columns
    for r in rows:
        r["simulated"] = flags.get(str(r["simulated"]).strip().lower()) if r["simulated"] is not None else None
        r["n_images"] = None if r["n_images"] is None else int(r["n_images"])
    return rows
