"""The verdict the orchestration acts on: ``degraded`` > ``drift`` > ``ok``, with its reasons.

Drift rule (multiple-testing aware): each group of features (image statistics, embedding PCs,
predictions) drifts when its smallest p-value is below ``family_alpha / tests in the group``
(Bonferroni: the group's false-alarm rate stays below ``family_alpha``); the embeddings also drift
when the domain classifier's ROC AUC reaches ``embedding_auc``; the batch drifts when any group does,
when the share of drifted features (each at ``feature_alpha``) reaches ``drift_share``, or when the
quarantined share exceeds ``max_quarantine_share``. Degraded: a labelled batch (at least
``min_labelled`` images) whose accuracy / macro F1 falls below the champion's test figure minus
``degradation_tolerance``.
"""

from __future__ import annotations

from typing import Any

from medflow.monitor import MonitorConfig


def group_threshold(tests: int, cfg: MonitorConfig) -> float:
    """Bonferroni threshold of a group of ``tests`` p-values: ``family_alpha / tests``."""
    return cfg.family_alpha / tests


def group_drift(features: dict[str, dict[str, Any]], embedding_auc: float | None,
                cfg: MonitorConfig) -> dict[str, dict[str, Any]]:
    """Per group: tests, smallest p-value, Bonferroni threshold, features below it (``significant_features``),
    features below ``feature_alpha`` (``drifted_features``, uncorrected), drifted."""
    groups: dict[str, dict[str, Any]] = {}
    for name, f in features.items():
        g = groups.setdefault(f["group"], {"tests": 0, "min_p": 1.0, "drifted_features": []})
        g["tests"] += 1
        g["min_p"] = min(g["min_p"], f["p_value"])
        if f["drifted"]:
            g["drifted_features"].append(name)
    for name, g in groups.items():
        g["threshold"] = group_threshold(g["tests"], cfg)
        g["significant_features"] = [c for c, f in features.items()
                                     if f["group"] == name and f["p_value"] < g["threshold"]]
        g["drifted"] = g["min_p"] < g["threshold"]
    if "embedding" in groups and embedding_auc is not None:
        groups["embedding"]["auc"] = embedding_auc
        groups["embedding"]["drifted"] |= embedding_auc >= cfg.embedding_auc
    return groups


def counts_toward_verdict(feature: dict[str, Any], groups: dict[str, dict[str, Any]], drift_share: float,
                          cfg: MonitorConfig) -> bool:
    """Whether a feature is a reason for a drift verdict: below its group's Bonferroni threshold, or below
    ``feature_alpha`` when the drifted share reaches ``drift_share``."""
    return (feature["p_value"] < groups[feature["group"]]["threshold"]
            or (feature["drifted"] and drift_share >= cfg.drift_share))


def decide(groups: dict[str, dict[str, Any]], drift_share: float, performance: dict[str, Any] | None,
           champion_metrics: dict[str, Any], quarantine_share: float, cfg: MonitorConfig) -> dict[str, Any]:
    """``{"verdict": ok|drift|degraded, "reasons": [...]}`` from the drift groups and the batch metrics."""
    drift: list[str] = []
    for name, g in groups.items():
        if g["drifted"]:
            why = f"p={g['min_p']:.3g} < {g['threshold']:.3g} (Bonferroni over {g['tests']})"
            if g.get("auc") is not None and g["auc"] >= cfg.embedding_auc:
                why = f"domain-classifier ROC AUC {g['auc']:.3f} >= {cfg.embedding_auc:.3g}"
            drift.append(f"{name} drift: {why}; features with p < {g['threshold']:.3g}: "
                         f"{', '.join(g['significant_features']) or 'none'}")
    if drift_share >= cfg.drift_share:
        drift.append(f"drifted feature share {drift_share:.2f} >= {cfg.drift_share:.3g} "
                     f"(p < {cfg.feature_alpha:.3g}, uncorrected)")
    if quarantine_share > cfg.max_quarantine_share:
        drift.append(f"quarantined share {quarantine_share:.2f} > {cfg.max_quarantine_share:.3g}")
    degraded: list[str] = []
    if performance and performance.get("n", 0) >= cfg.min_labelled:
        for metric in cfg.degradation_metrics:
            batch, champ = performance.get(metric), champion_metrics.get(metric)
            if batch is not None and champ is not None and batch < champ - cfg.degradation_tolerance:
                degraded.append(f"{metric} {batch:.3f} < champion test {champ:.3f} - {cfg.degradation_tolerance:.3g}")
    verdict = "degraded" if degraded else "drift" if drift else "ok"
    return {"verdict": verdict, "reasons": degraded + drift}
