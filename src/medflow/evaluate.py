"""Test-split evaluation, model comparison and the champion record.

Every metric comes from scikit-learn except the expected calibration error (ECE), which
scikit-learn does not provide: it is the usual top-label ECE over equal-width confidence bins
(the binning of ``sklearn.calibration.calibration_curve``).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pandas as pd
import sklearn
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from medflow.config import ChampionMetric, ConfigError
from medflow.layout import OutOfDate, require
from medflow.io import (
    atomic_write,
    atomic_write_csv,
    atomic_write_json,
    read_csv,
    sha256_file,
)

# Scalar metrics written to the metrics JSON; the champion metric must be one of them.
SCALAR_METRICS: tuple[str, ...] = get_args(ChampionMetric)  # one list: what params.yaml may name
LOWER_IS_BETTER = frozenset({"ece"})


# --------------------------------------------------------------------------- hashing helpers
file_hash = sha256_file


def dir_hash(path: str | Path) -> str:
    """SHA-256 over every file below ``path`` (relative names and contents, sorted)."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + file_hash(p).encode() + b"\n")
    return h.hexdigest()


MODEL_PARAMS = ("data", "ingest", "split", "preprocess", "train", "active_models", "evaluate")


def params_hash(params: Any) -> str:
    """SHA-256 (sorted JSON) of the params that shape the champion: the :data:`MODEL_PARAMS` sections and the
    active models' entries; serving, monitoring, retraining and validation settings are left out, as they
    are out of the ``compare`` stage's params in dvc.yaml."""
    dumped = params.model_dump(mode="json", by_alias=True) if hasattr(params, "model_dump") else params
    active = dumped.get("active_models") or []
    shaping = {k: dumped.get(k) for k in MODEL_PARAMS}
    shaping["models"] = {m: (dumped.get("models") or {}).get(m) for m in active}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_csv(path, df)


# --------------------------------------------------------------------------- metrics
def calibration_table(y_true: np.ndarray, proba: np.ndarray, bins: int) -> pd.DataFrame:
    """Reliability table of the top-label confidence: one row per equal-width bin.

    Columns: bin, lower, upper, count, confidence (mean top probability), accuracy (share correct);
    confidence/accuracy are NaN for empty bins.
    """
    y_true = np.asarray(y_true)
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ids = np.searchsorted(edges[1:-1], conf)
    count = np.bincount(ids, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(ids, weights=conf, minlength=bins) / count
        mean_acc = np.bincount(ids, weights=correct, minlength=bins) / count
    return pd.DataFrame(
        {"bin": np.arange(bins), "lower": edges[:-1], "upper": edges[1:], "count": count,
         "confidence": mean_conf, "accuracy": mean_acc}
    )


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, bins: int) -> float:
    """Top-label ECE: sum over bins of (share of samples) x |accuracy - confidence|."""
    t = calibration_table(y_true, proba, bins)
    used = t["count"] > 0
    gap = (t.loc[used, "accuracy"] - t.loc[used, "confidence"]).abs()
    return float((t.loc[used, "count"] / t["count"].sum() * gap).sum())


def _roc_auc(y_true: np.ndarray, proba: np.ndarray) -> float | None:
    """Binary: plain ROC-AUC of the positive class; multi-class: macro one-vs-rest.

    Classes absent from ``y_true`` are left out of the macro average; None when undefined.
    """
    k = proba.shape[1]
    if k == 2:
        return float(roc_auc_score(y_true, proba[:, 1])) if len(np.unique(y_true)) == 2 else None
    present = [c for c in range(k) if 0 < np.sum(y_true == c) < len(y_true)]
    if len(present) < 2:
        return None
    if len(present) == k:
        return float(roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=list(range(k))))
    return float(np.mean([roc_auc_score(y_true == c, proba[:, c]) for c in present]))


def _scalars(y_true: np.ndarray, proba: np.ndarray, *, ordered: bool, bins: int) -> dict[str, float | None]:
    k = proba.shape[1]
    labels = list(range(k))
    y_pred = proba.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (UndefinedMetricWarning, UserWarning, RuntimeWarning))
        out: dict[str, float | None] = {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            # over the classes in y_true or y_pred (scikit-learn's default): a class with no test image that is
            # never predicted is left out, as in balanced accuracy and ROC-AUC, not counted as F1 = 0
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "roc_auc": _roc_auc(y_true, proba),
        }
        if ordered:
            qwk = cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic")
            out["qwk"] = None if np.isnan(qwk) else float(qwk)
    out["ece"] = expected_calibration_error(y_true, proba, bins)
    return out


def _resamples(n_items: int, groups: Sequence[str] | None, n: int, seed: int) -> Iterator[np.ndarray]:
    """``n`` bootstrap index arrays over ``n_items`` test images: whole patient/slide ``groups`` drawn with
    replacement when given (images of one group are not independent), else single images."""
    rng = np.random.default_rng(seed)
    if groups is None:
        members = None
        units = n_items
    else:
        codes, uniques = pd.factorize(np.asarray(groups, dtype=object), sort=False)
        order = np.argsort(codes, kind="stable")
        members = np.split(order, np.cumsum(np.bincount(codes, minlength=len(uniques)))[:-1])
        units = len(uniques)
    for _ in range(n):
        pick = rng.integers(0, units, units)
        yield pick if members is None else np.concatenate([members[g] for g in pick])


def _bootstrap_ci(
    y_true: np.ndarray, proba: np.ndarray, *, ordered: bool, bins: int, n: int, seed: int,
    groups: Sequence[str] | None = None,
) -> dict[str, list[float] | None]:
    """Percentile 95% intervals from ``n`` resamples (with replacement) of the test set (see :func:`_resamples`)."""
    draws: dict[str, list[float]] = {}
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):  # inputs checked once
        for idx in _resamples(len(y_true), groups, n, seed):
            for name, value in _scalars(y_true[idx], proba[idx], ordered=ordered, bins=bins).items():
                if value is not None:
                    draws.setdefault(name, []).append(value)
    return {name: [float(v) for v in np.percentile(vals, [2.5, 97.5])] for name, vals in draws.items()}


def _per_class_ci(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], *, n: int, seed: int,
                  groups: Sequence[str] | None = None) -> dict[str, dict[str, list[float] | None]]:
    """Percentile 95% intervals of each class's precision and recall over the resamples of :func:`_bootstrap_ci`
    (the same draws: same ``seed``); a resample without images of (or predictions for) a class is left out
    of that class's recall (precision); None when no resample has any."""
    k = len(classes)
    draws = {"precision": [], "recall": []}
    for idx in _resamples(len(y_true), groups, n, seed):
        yt, yp = y_true[idx], y_pred[idx]
        hits = np.bincount(yt[yt == yp], minlength=k).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            draws["recall"].append(hits / np.bincount(yt, minlength=k))
            draws["precision"].append(hits / np.bincount(yp, minlength=k))
    out: dict[str, dict[str, list[float] | None]] = {c: {} for c in classes}
    for name, rows in draws.items():
        values = np.asarray(rows).reshape(-1, k)
        for i, c in enumerate(classes):
            col = values[:, i][np.isfinite(values[:, i])]
            out[c][name] = [float(v) for v in np.percentile(col, [2.5, 97.5])] if len(col) else None
    return out


CONFUSION_METRICS = frozenset({"accuracy", "balanced_accuracy", "macro_f1", "qwk"})  # functions of the confusion matrix


def confusion_scalars(cm: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy, balanced_accuracy, macro_f1 and qwk of a stack of confusion matrices (``... x K x K``, rows =
    actual), vectorised over the leading axes (bootstrap draws): the values :func:`_scalars` gets from
    scikit-learn for the images counted (balanced accuracy over the classes present, macro F1 over the classes
    present or predicted, quadratic kappa over all K); NaN where undefined (kappa of one class)."""
    cm = np.asarray(cm, dtype=float)
    k = cm.shape[-1]
    hits = np.diagonal(cm, axis1=-2, axis2=-1)
    actual, predicted = cm.sum(axis=-1), cm.sum(axis=-2)
    total = actual.sum(axis=-1)
    weights = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2.0
    seen = actual > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(seen, hits / actual, 0.0)
        f1 = np.where(seen | (predicted > 0), 2 * hits / (actual + predicted), 0.0)  # 2tp / (2tp + fp + fn)
        expected = np.einsum("...i,...j,ij->...", predicted, actual, weights) / total
        return {
            "accuracy": hits.sum(axis=-1) / total,
            "balanced_accuracy": recall.sum(axis=-1) / seen.sum(axis=-1),
            "macro_f1": f1.sum(axis=-1) / (seen | (predicted > 0)).sum(axis=-1),
            "qwk": np.where(expected > 0, 1 - (cm * weights).sum(axis=(-2, -1)) / expected, np.nan),
        }


def _metric_draws(y_true: np.ndarray, probas: Sequence[np.ndarray], metric: str, *, bins: int, n: int, seed: int,
                  groups: Sequence[str] | None) -> np.ndarray:
    """``metric`` of each of ``probas`` (M models) on the same ``n`` draws of :func:`_resamples`: M x n, NaN where
    undefined. Confusion-matrix metrics come from per-draw counts at once (:func:`confusion_scalars`); roc_auc
    and ece are computed draw by draw."""
    out = np.full((len(probas), n), np.nan)
    draws = _resamples(len(y_true), groups, n, seed)
    if metric in CONFUSION_METRICS:
        k = probas[0].shape[1]
        cells = [y_true * k + p.argmax(axis=1) for p in probas]
        counts = np.zeros((len(probas), n, k * k))
        for d, idx in enumerate(draws):
            for m, c in enumerate(cells):
                counts[m, d] = np.bincount(c[idx], minlength=k * k)
        return confusion_scalars(counts.reshape(len(probas), n, k, k))[metric]
    one: Callable[[np.ndarray, np.ndarray], float | None] = {
        "roc_auc": _roc_auc, "ece": lambda yt, p: expected_calibration_error(yt, p, bins)}[metric]
    with warnings.catch_warnings(), sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        warnings.simplefilter("ignore", (UndefinedMetricWarning, UserWarning, RuntimeWarning))
        for d, idx in enumerate(draws):
            for m, p in enumerate(probas):
                value = one(y_true[idx], p[idx])
                out[m, d] = np.nan if value is None else value
    return out


def paired_difference(
    y_true: np.ndarray, proba_a: np.ndarray, proba_b: np.ndarray, metric: str, *, ordered: bool, bins: int,
    n: int, seed: int, groups: Sequence[str] | None = None, confidence: float | None = None,
) -> dict[str, Any]:
    """``metric`` of model a minus model b on the same test images, with a 95% interval from paired resamples
    (the same draws for both); ``share_a_better``: the share of draws where a is better (lower for ece).
    With ``confidence`` (0 < c < 1) also ``lower_bound``: the one-sided lower confidence bound of a's
    improvement over b (a - b, b - a for ece), the (1 - c) quantile of the draws."""
    y = np.asarray(y_true, dtype=int)
    a, b = (_scalars(y, p, ordered=ordered, bins=bins).get(metric) for p in (proba_a, proba_b))
    extra = {} if confidence is None else {"lower_bound": None}
    if a is None or b is None:
        return {"metric": metric, "difference": None, "ci95": None, "share_a_better": None, **extra}
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    da, db = _metric_draws(y, [np.asarray(proba_a, float), np.asarray(proba_b, float)], metric, bins=bins, n=n,
                           seed=seed, groups=groups)
    d = (da - db)[np.isfinite(da) & np.isfinite(db)]
    if confidence is not None and len(d):
        extra["lower_bound"] = float(np.percentile(sign * d, 100 * (1 - confidence)))
    return {"metric": metric, "difference": float(a - b),
            "ci95": [float(v) for v in np.percentile(d, [2.5, 97.5])] if len(d) else None,
            "share_a_better": float(np.mean(sign * d > 0)) if len(d) else None, **extra}


def compute_metrics(
    y_true: Iterable[int],
    proba: np.ndarray,
    classes: list[str],
    *,
    ordered: bool = False,
    bootstrap: int = 1000,
    bins: int = 10,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """All test metrics for integer labels ``y_true`` and class probabilities ``proba`` (N x K).

    Returns accuracy, balanced_accuracy, macro_f1, roc_auc, qwk (only when ``ordered``), ece,
    n, per_class {class: {precision, recall, f1, support}}, confusion (rows = actual),
    ci95 {metric: [lo, hi]} (empty when ``bootstrap`` is 0; resampling the patient/slide ``groups`` when
    given), per_class_ci95 {class: {precision: [lo, hi], recall: [lo, hi]}} (same resamples; empty when
    ``bootstrap`` is 0), ci_unit ("groups" or "images") and ci_units (how many). JSON-able.
    """
    y = np.asarray(list(y_true), dtype=int)
    p = np.asarray(proba, dtype=float)
    if p.ndim != 2 or p.shape != (len(y), len(classes)):
        raise ValueError(f"proba must be N x K = {len(y)} x {len(classes)}, got {p.shape}")
    labels = list(range(len(classes)))
    y_pred = p.argmax(axis=1)
    prec, rec, f1, sup = precision_recall_fscore_support(y, y_pred, labels=labels, zero_division=0)
    out: dict[str, Any] = _scalars(y, p, ordered=ordered, bins=bins)
    out["n"] = int(len(y))
    out["per_class"] = {
        c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(sup[i])}
        for i, c in enumerate(classes)
    }
    out["confusion"] = confusion_matrix(y, y_pred, labels=labels).tolist()
    if groups is not None and len(groups) != len(y):
        raise ValueError(f"groups has {len(groups)} entries for {len(y)} test images")
    out["ci95"] = _bootstrap_ci(y, p, ordered=ordered, bins=bins, n=bootstrap, seed=seed,
                                groups=groups) if bootstrap else {}
    out["per_class_ci95"] = _per_class_ci(y, y_pred, classes, n=bootstrap, seed=seed, groups=groups) if bootstrap else {}
    out["ci_unit"] = "images" if groups is None else "groups"
    out["ci_units"] = len(y) if groups is None else len(set(groups))
    return out


def positive_index(classes: list[str], positive: str | None) -> int | None:
    """Index of ``evaluate.positive_class`` among ``classes`` (None when unset or not binary); a class the
    data does not have is a ConfigError."""
    if positive is None:
        return None
    if positive not in classes:
        raise ConfigError(f"evaluate.positive_class {positive!r} is not one of the data's classes {classes}: set it "
                          "to one of them (the class a two-class ROC curve and sensitivity are about) or to null")
    return classes.index(positive) if len(classes) == 2 else None


def roc_table(y_true: np.ndarray, proba: np.ndarray, classes: list[str], positive: int | None = None) -> pd.DataFrame:
    """ROC points (class, fpr, tpr, threshold): of class ``positive`` alone when given (binary), else of every
    class against the rest."""
    y = np.asarray(y_true)
    wanted = [positive] if positive is not None else range(len(classes))
    frames = []
    for c in wanted:
        if 0 < np.sum(y == c) < len(y):
            fpr, tpr, thr = roc_curve(y == c, proba[:, c])
            frames.append(pd.DataFrame({"class": classes[c], "fpr": fpr, "tpr": tpr,
                                        "threshold": np.minimum(thr, 1.0)}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["class", "fpr", "tpr", "threshold"])


# --------------------------------------------------------------------------- evaluate one model
def _pick_per_class(labels: np.ndarray, k: int, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` test images of each class (deterministic)."""
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(k)]).astype(int)


def evaluate(
    model_name: str,
    params: Any,
    processed_dir: str | Path,
    model_dir: str | Path,
    metrics_json: str | Path,
    eval_dir: str | Path,
    *,
    arrays: tuple[np.ndarray, np.ndarray, list[str]] | None = None,
    meta: Mapping[str, Any] | None = None,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Predict the test split with ``model_dir/model.keras`` and write every evaluation output.

    Writes ``metrics_json`` (flat scalars for ``dvc metrics show``) and, in ``eval_dir``:
    details.json (all of :func:`compute_metrics` + classes), predictions.csv (id, label, pred,
    p_<class>..., group), roc.csv, confusion.csv (actual, predicted), calibration.csv,
    misclassified.csv (+ misclassified.png) and gradcam.png. The bootstrap intervals resample the test
    images' patient/slide groups. ``arrays`` (images uint8, labels, ids), ``meta`` and ``groups`` (one per
    image; default: each image its own) replace reading the shards (tests, notebooks).
    """
    from medflow.models.gradcam import GRADCAM_COLORMAP, gradcam, overlay
    from medflow.models.registry import (
        load_model,  # registers the custom layers; safe_mode on
    )
    from medflow.report.figures import image_grid

    processed_dir, model_dir, eval_dir = Path(processed_dir), Path(model_dir), Path(eval_dir)
    require(model_dir / "model.keras", f"medflow train {model_name}")
    if meta is None or arrays is None:
        from medflow.data import shards

        meta = meta if meta is not None else shards.read_meta(processed_dir)
        if arrays is None:
            arrays = shards.load_arrays(processed_dir, "test")
            if (known := shards.read_groups(processed_dir, "test")) is not None:
                group_of = dict(zip(shards.read_ids(processed_dir, "test"), known, strict=True))
                groups = [group_of[i] for i in arrays[2]]
    images, labels, ids = arrays
    labels = np.asarray(labels, dtype=int)
    classes = list(meta["classes"])
    ordered = bool(meta.get("ordered", False))
    cfg = params.evaluate
    positive = positive_index(classes, cfg.positive_class)
    model_sha = file_hash(model_dir / "model.keras")  # of the file loaded next, as `compare` checks it
    model = load_model(model_dir / "model.keras")
    batch = params.models[model_name].batch_size if model_name in params.models else 32

    proba = np.asarray(model.predict(images.astype("float32"), batch_size=batch, verbose=0), dtype=float)
    m = compute_metrics(labels, proba, classes, ordered=ordered, bootstrap=cfg.bootstrap,
                        bins=cfg.calibration_bins, seed=params.train.seed, groups=groups)
    flat = {k: m[k] for k in SCALAR_METRICS if k in m}
    flat.update(n_test=m["n"], num_params=int(model.count_params()))
    atomic_write_json(Path(metrics_json), flat)

    eval_dir.mkdir(parents=True, exist_ok=True)
    # the evaluated file's hash: a retrained model changes this output even when its metrics do not, so
    # `compare` reruns and the champion record never names a stale model_sha256
    atomic_write_json(eval_dir / "details.json", {"model": model_name, "classes": classes, "ordered": ordered,
                                                  "model_sha256": model_sha, **flat, **m})
    pred = proba.argmax(axis=1)
    names = np.asarray(classes, dtype=object)
    preds = pd.DataFrame({"id": list(ids), "label": names[labels], "pred": names[pred]})
    for i, c in enumerate(classes):
        preds[f"p_{c}"] = proba[:, i]
    preds["group"] = list(groups) if groups is not None else list(ids)  # unknown: each image its own
    _write_csv(eval_dir / "predictions.csv", preds)
    _write_csv(eval_dir / "confusion.csv", preds[["label", "pred"]].set_axis(["actual", "predicted"], axis=1))
    _write_csv(eval_dir / "roc.csv", roc_table(labels, proba, classes, positive))
    _write_csv(eval_dir / "calibration.csv", calibration_table(labels, proba, cfg.calibration_bins))

    # Misclassified test images, most confident mistakes first.
    conf = proba.max(axis=1)
    wrong = np.flatnonzero(pred != labels)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][: cfg.misclassified_max]
    mis = preds.iloc[wrong][["id", "label", "pred"]].assign(confidence=conf[wrong])
    _write_csv(eval_dir / "misclassified.csv", mis)
    (eval_dir / "misclassified.png").unlink(missing_ok=True)
    if len(wrong):
        titles = [f"true {names[labels[i]]}\npred {names[pred[i]]} ({conf[i]:.0%})" for i in wrong]
        atomic_write(eval_dir / "misclassified.png", image_grid(list(images[wrong]), titles))

    # Grad-CAM over the first few test images of every class (for the predicted class).
    (eval_dir / "gradcam.png").unlink(missing_ok=True)
    pick = _pick_per_class(labels, len(classes), cfg.gradcam_per_class)
    if len(pick):
        heat = gradcam(model, images[pick].astype("float32"))
        tiles, titles = [], []
        for j, i in enumerate(pick):
            tiles += [images[i], overlay(images[i], heat[j])]
            titles += [f"true {names[labels[i]]}", f"pred {names[pred[i]]} ({conf[i]:.0%})"]
        atomic_write(eval_dir / "gradcam.png", image_grid(tiles, titles, ncols=2 * max(1, cfg.gradcam_per_class),
                                                          colorbar=(GRADCAM_COLORMAP, "influence on the answer")))

    return {"model": model_name, **flat, "misclassified": int((pred != labels).sum())}


# --------------------------------------------------------------------------- input profile
# The champion record's ``input_profile``: what the training images looked like, so that serve and predict
# can warn about an input that does not (medflow.serve.profile checks it). Statistics are the manifest's
# (ingest's image_stats of the decoded 8-bit RGB image): grey-level mean, std and variance of the Laplacian.
PROFILE_STATS = ("mean", "std", "sharpness")
# Robust bounds: these percentiles of the train rows, so that a few odd training images do not stretch them ...
PROFILE_PERCENTILES = (0.5, 99.5)
# ... widened on each side by this share of the span between them: held-out images of the same data fall
# a little outside the train split's range (malaria sample: 20 of 160 val/test cells outside the bare
# 0.5-99.5 percentile range, 8 with a 10% margin, 1 with 25%), while inputs that are not that kind of
# image (blank, noise, CT slices) fall far outside it.
PROFILE_MARGIN = 0.25


def input_profile(rows: pd.DataFrame) -> dict[str, Any]:
    """The input profile of manifest ``rows`` (the train split's): formats, channels and bit depths as found,
    DICOM modalities, and per statistic of :data:`PROFILE_STATS` the bounds ``[lo, hi]``: the
    :data:`PROFILE_PERCENTILES` widened by :data:`PROFILE_MARGIN` of their span on each side (lo not below 0,
    rounded to 4 decimals). Small and JSON-serialisable."""
    if rows.empty:
        raise ValueError("input profile: no training rows")
    fmt = rows["format"].astype(str).str.lower()
    dicom = rows.loc[fmt == "dicom", "modality"] if "modality" in rows else pd.Series(dtype=object)
    stats: dict[str, list[float]] = {}
    for name in PROFILE_STATS:
        values = pd.to_numeric(rows[name], errors="coerce").dropna().to_numpy(dtype=np.float64)
        if len(values):
            lo, hi = np.percentile(values, PROFILE_PERCENTILES)
            pad = PROFILE_MARGIN * (hi - lo)
            stats[name] = [round(max(0.0, float(lo - pad)), 4), round(float(hi + pad), 4)]
    return {
        "rows": len(rows),
        "formats": sorted(set(fmt)),
        "channels": sorted({int(c) for c in rows["channels"].dropna()}),
        "bit_depths": sorted({int(b) for b in rows["bit_depth"].dropna()}),
        "modalities": sorted({str(m) for m in dicom.dropna() if str(m)}),
        "stats": stats,
        "percentiles": list(PROFILE_PERCENTILES),
        "margin": PROFILE_MARGIN,
    }


def train_rows(manifest: str | Path, splits: str | Path) -> pd.DataFrame:
    """The manifest rows the split stage put in ``train`` (what the models were fitted on)."""
    rows = read_csv(manifest, ["id", "format", "channels", "bit_depth", "modality", *PROFILE_STATS],
                    text=("id", "format", "modality"))
    assigned = read_csv(splits, ["id", "split"], text=("id", "split"))
    train = rows[rows["id"].isin(assigned.loc[assigned["split"] == "train", "id"])]
    if train.empty:
        raise OutOfDate(f"{splits}: no train rows of {manifest} (rerun the split stage: `dvc repro split`)")
    return train


# --------------------------------------------------------------------------- compare + champion
def _rank_key(metric: str) -> Callable[[tuple[str, dict[str, Any]]], tuple]:
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0

    def key(item: tuple[str, dict[str, Any]]) -> tuple:
        name, m = item
        value = m.get(metric)
        missing = value is None or (isinstance(value, float) and np.isnan(value))
        # rounded: one value computed two ways (110/120 as 55+55 or 56+54 recalls) must tie
        return (missing, 0.0 if missing else round(sign * float(value), 12), m.get("num_params") or 0, name)

    return key


def compare(
    metrics_jsons: Mapping[str, str | Path] | Iterable[str | Path],
    comparison_csv: str | Path,
    champion_json: str | Path,
    *,
    metric: str,
    data_hash: str,
    params_hash: str,
    meta: Mapping[str, Any] | None = None,
    root: str | Path = ".",
    bootstrap: int = 1000,
    bins: int = 10,
    seed: int = 0,
    manifest: str | Path | None = None,
    splits: str | Path | None = None,
) -> dict[str, Any]:
    """Rank models by ``metric``, write the comparison table and the champion record.

    ``metrics_jsons``: {model name: metrics JSON path} or a list of paths (name = file stem).
    Best = highest ``metric`` (lowest for ece); ties: fewer parameters, then name. ``meta`` supplies
    classes, image_size, channels, ordered (default: the shards' meta.json under ``root``).
    ``model_path`` in the record is relative to ``root``. The record's ``runner_up`` holds the champion's
    ``metric`` minus the runner-up's with a paired bootstrap interval (:func:`paired_difference`, from both
    models' predictions.csv, resampling patient/slide groups; ``bootstrap`` draws). With the ingest
    ``manifest`` and the ``splits`` table, the record's ``input_profile`` describes the train images
    (:func:`input_profile`; serve and predict warn about inputs outside it); without them it has none.
    Returns the champion record.
    """
    from medflow.layout import Layout

    if meta is None:
        from medflow.data.shards import read_meta

        meta = read_meta(Layout(Path(root)).processed)
    if not isinstance(metrics_jsons, Mapping):
        metrics_jsons = {Path(p).stem: p for p in metrics_jsons}
    if not metrics_jsons:
        raise ValueError("compare needs at least one model's metrics")
    metrics = {name: json.loads(require(Path(p), f"medflow evaluate {name}").read_text())
               for name, p in metrics_jsons.items()}
    if not any(metric in m for m in metrics.values()):
        raise ValueError(f"champion metric {metric!r} is in no metrics file; available: {list(SCALAR_METRICS)}")
    if (manifest is None) != (splits is None):
        raise ValueError("compare: the input profile needs both the manifest and the splits table")
    profile = input_profile(train_rows(manifest, splits)) if manifest is not None and splits is not None else None

    ranked = sorted(metrics.items(), key=_rank_key(metric))
    rows = [{"model": name, "rank": r + 1, "champion": r == 0, **m} for r, (name, m) in enumerate(ranked)]
    _write_csv(Path(comparison_csv), pd.DataFrame(rows))

    name, best = ranked[0]
    details_json = Layout(Path(root)).eval_dir(name) / "details.json"
    details = json.loads(details_json.read_text()) if details_json.exists() else {}
    if details:  # per-class test figures travel with the champion (monitoring, promotion)
        best = {**best, "per_class": details.get("per_class")}
    model_path = f"models/{name}/model.keras"
    model_file = Path(root) / model_path
    model_sha = file_hash(model_file) if model_file.exists() else None
    evaluated = details.get("model_sha256")
    if evaluated and model_sha and evaluated != model_sha:  # retrained since evaluate: metrics are another file's
        raise OutOfDate(f"{model_file} changed after it was evaluated (sha256 {model_sha[:12]}, evaluated "
                         f"{evaluated[:12]}): rerun `medflow evaluate {name}` (or `dvc repro`) before compare")
    short = hashlib.sha256(f"{model_sha}|{data_hash}|{params_hash}".encode()).hexdigest()[:8]
    record = {
        "model": name,
        "model_path": model_path,
        "classes": list(meta["classes"]),
        "image_size": int(meta["image_size"]),
        "channels": int(meta["channels"]),
        "ordered": bool(meta.get("ordered", False)),
        "metric": metric,
        "metrics": best,
        "data_hash": data_hash,
        "params_hash": params_hash,
        "version": f"{name}-{short}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_sha256": model_sha,
    }
    if profile is not None:
        record["input_profile"] = profile
    if len(ranked) > 1 and bootstrap:
        record["runner_up"] = _versus(Layout(Path(root)), name, ranked[1][0], metric, list(meta["classes"]),
                                      ordered=bool(meta.get("ordered", False)), bins=bins, n=bootstrap, seed=seed)
    atomic_write_json(Path(champion_json), record)
    return record


def _versus(layout: Any, a: str, b: str, metric: str, classes: list[str], **kwargs: Any) -> dict[str, Any]:
    """:func:`paired_difference` of models ``a`` and ``b`` from their predictions.csv (same test images)."""
    paths = [layout.eval_dir(m) / "predictions.csv" for m in (a, b)]
    frames = [read_csv(p, text=("id", "label", "group")) if p.is_file() else None for p in paths]
    if any(f is None for f in frames) or not frames[0]["id"].equals(frames[1]["id"]):
        return {"model": b, "metric": metric, "difference": None, "ci95": None, "share_a_better": None,
                "note": "predictions of the two models are missing or not on the same test images"}
    first = frames[0]
    y = pd.Index(classes).get_indexer(first["label"].astype(str))
    probas = [f[[f"p_{c}" for c in classes]].to_numpy(dtype=float) for f in frames]
    groups = first["group"].astype(str).tolist() if "group" in first else None
    return {"model": b, **paired_difference(y, *probas, metric, groups=groups, **kwargs)}

