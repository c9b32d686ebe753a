"""The verdict the orchestration acts on: ``degraded`` > ``drift`` > ``ok``, with its reasons.

One rule says whether a feature drifted, on every page and in every file: its p-value is below its
group's Bonferroni threshold, ``family_alpha / tests in the group`` (image statistics, embedding PCs,
predictions; the group's false-alarm rate stays below ``family_alpha``). Evidently's per-column test runs
at that threshold too (:func:`medflow.monitor.drift.drift_snapshot`). A group drifts when one of its
features drifts; the embeddings also when the domain classifier's ROC AUC reaches ``embedding_auc``.
The batch drifts when any group does, when many features move a little at once (the share of features
with p < ``feature_alpha``, uncorrected, reaches ``drift_share``: a broad weak shift no single test
catches), or when the quarantined share exceeds ``max_quarantine_share``. Degraded: a labelled batch (at
least ``min_labelled`` images) whose verdict metrics (``degradation_metrics``) fall below the champion's
test figures minus ``degradation_tolerance``.
"""

from __future__ import annotations

from typing import Any

from medflow.monitor import MonitorConfig

WARNING = "warning: "  # starts a reason that does not change the verdict


def group_threshold(tests: int, cfg: MonitorConfig) -> float:
    """Bonferroni threshold of a group of ``tests`` p-values: ``family_alpha / tests``."""
    return cfg.family_alpha / tests


def feature_drifted(feature: dict[str, Any], groups: dict[str, dict[str, Any]]) -> bool:
    """The one drift rule of a feature: its p-value is below its group's Bonferroni threshold."""
    return feature["p_value"] < groups[feature["group"]]["threshold"]


def group_drift(features: dict[str, dict[str, Any]], embedding_auc: float | None,
                cfg: MonitorConfig) -> dict[str, dict[str, Any]]:
    """Per group: tests, smallest p-value, Bonferroni threshold, the features below it (``drifted_features``),
    drifted."""
    groups: dict[str, dict[str, Any]] = {}
    for f in features.values():
        g = groups.setdefault(f["group"], {"tests": 0, "min_p": 1.0})
        g["tests"] += 1
        g["min_p"] = min(g["min_p"], f["p_value"])
    for name, g in groups.items():
        g["threshold"] = group_threshold(g["tests"], cfg)
        g["drifted_features"] = [c for c, f in features.items()
                                 if f["group"] == name and f["p_value"] < g["threshold"]]
        g["drifted"] = bool(g["drifted_features"])
    if "embedding" in groups and embedding_auc is not None:
        groups["embedding"]["auc"] = embedding_auc
        groups["embedding"]["drifted"] |= embedding_auc >= cfg.embedding_auc
    return groups


def weak_shift(share_below_alpha: float, cfg: MonitorConfig) -> bool:
    """The broad-weak-shift rule: the share of features with p < ``feature_alpha`` reaches ``drift_share``."""
    return share_below_alpha >= cfg.drift_share


def counts_toward_verdict(feature: dict[str, Any], groups: dict[str, dict[str, Any]], share_below_alpha: float,
                          cfg: MonitorConfig) -> bool:
    """Whether a feature is a reason for a drift verdict: it drifted (below its group's Bonferroni threshold),
    or it has p < ``feature_alpha`` and the broad-weak-shift rule fired."""
    return (feature_drifted(feature, groups)
            or (feature["p_value"] < cfg.feature_alpha and weak_shift(share_below_alpha, cfg)))


def decide(groups: dict[str, dict[str, Any]], share_below_alpha: float, performance: dict[str, Any] | None,
           champion_metrics: dict[str, Any], quarantine_share: float, cfg: MonitorConfig) -> dict[str, Any]:
    """``{"verdict": ok|drift|degraded, "reasons": [...]}`` from the drift groups, the share of features with
    p < ``feature_alpha`` (uncorrected), the batch metrics and the quarantined share."""
    drift: list[str] = []
    for name, g in groups.items():
        if g["drifted"]:
            why = f"p={g['min_p']:.3g} < {g['threshold']:.3g} (Bonferroni over {g['tests']})"
            if g.get("auc") is not None and g["auc"] >= cfg.embedding_auc:
                why = f"domain-classifier ROC AUC {g['auc']:.3f} >= {cfg.embedding_auc:.3g}"
            drift.append(f"{name} drift: {why}; drifted features (p < {g['threshold']:.3g}): "
                         f"{', '.join(g['drifted_features']) or 'none'}")
    if weak_shift(share_below_alpha, cfg):
        drift.append(f"broad weak shift: share of features with p < {cfg.feature_alpha:.3g} (uncorrected) "
                     f"{share_below_alpha:.2f} >= {cfg.drift_share:.3g}")
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
