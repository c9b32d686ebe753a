"""Evidently (0.7) drift and classification reports of a batch against the reference, and their values.

Every feature gets one Evidently ``ValueDrift`` p-value test (``num_stattest`` / ``cat_stattest``) at its
group's Bonferroni threshold (``family_alpha / tests in the group``), so Evidently's per-column "drift
detected" and medflow's ``drifted`` flag, lists, count and share all apply the verdict's rule (p below the
threshold; Evidently's ks and cramer_von_mises also call a p-value equal to it drift, a tie of probability 0).
The share of features with p < ``feature_alpha`` (uncorrected) is kept apart, for the verdict's
broad-weak-shift rule. The embedding PCs are also scored jointly by Evidently's embedding drift method
``model`` (a domain classifier's ROC AUC, reference vs batch), called directly: its ``EmbeddingsDrift``
metric would add a t-SNE plot that costs more than the rest of the report.
Classification quality is an Evidently report on the labelled batch alone
(the reference is the training split, whose scores would flatter the model).
"""

from __future__ import annotations

import warnings
from typing import Any

import pandas as pd

from medflow.monitor import MonitorConfig
from medflow.monitor.features import IMAGE_FEATURES
from medflow.monitor.verdict import group_threshold


def feature_groups(pcs: list[str]) -> dict[str, list[str]]:
    """Drift-tested columns by group."""
    return {"image": list(IMAGE_FEATURES), "embedding": list(pcs), "prediction": ["prediction", "confidence"]}


def _definition(numerical: list[str], categorical: list[str], classification: list | None = None):
    from evidently import DataDefinition

    return DataDefinition(numerical_columns=numerical, categorical_columns=categorical, classification=classification)


def drift_snapshot(reference: pd.DataFrame, current: pd.DataFrame, pcs: list[str], cfg: MonitorConfig):
    """Run the drift report (current vs reference); return the Evidently snapshot."""
    from evidently import Dataset, Report
    from evidently.metrics import ValueDrift

    groups = feature_groups(pcs)
    numerical = [c for g in groups.values() for c in g if c != "prediction"]
    columns = numerical + ["prediction"]
    definition = _definition(numerical, ["prediction"])
    metrics: list[Any] = [ValueDrift(column=c, method=cfg.cat_stattest if c == "prediction" else cfg.num_stattest,
                                     threshold=group_threshold(len(cols), cfg))
                          for cols in groups.values() for c in cols]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Evidently's plotting internals (pandas/plotly deprecations)
        return Report(metrics).run(Dataset.from_pandas(current[columns].copy(), data_definition=definition),
                                   Dataset.from_pandas(reference[columns].copy(), data_definition=definition))


def drift_values(snapshot: Any, pcs: list[str], cfg: MonitorConfig) -> dict[str, Any]:
    """Per feature: group, test, p-value, ``threshold`` (the one Evidently tested at: the group's Bonferroni
    threshold), ``drifted`` (p below it) and ``below_feature_alpha`` (p < ``feature_alpha``, uncorrected);
    the drifted count and share, and the count and share below ``feature_alpha``."""
    group_of = {c: g for g, cols in feature_groups(pcs).items() for c in cols}
    features: dict[str, dict[str, Any]] = {}
    for m in snapshot.dict()["metrics"]:
        col, p, threshold = m["config"]["column"], float(m["value"]), float(m["config"]["threshold"])
        features[col] = {"group": group_of[col], "test": m["config"]["method"], "p_value": p,
                         "threshold": threshold, "drifted": p < threshold, "below_feature_alpha": p < cfg.feature_alpha}
    count = sum(f["drifted"] for f in features.values())
    below = sum(f["below_feature_alpha"] for f in features.values())
    return {"drifted_count": count, "drift_share": count / len(features),
            "below_feature_alpha_count": below, "share_below_feature_alpha": below / len(features),
            "features": {c: features[c] for c in group_of}}


def embedding_auc(reference: pd.DataFrame, current: pd.DataFrame, pcs: list[str], cfg: MonitorConfig) -> float:
    """ROC AUC of a classifier telling batch from reference embeddings (0.5 = indistinguishable)."""
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import (
        model as domain_classifier,
    )

    auc, _, _ = domain_classifier(threshold=cfg.embedding_auc)(current[pcs].copy(), reference[pcs].copy())
    return float(auc)


def classification_snapshot(current: pd.DataFrame, classes: list[str], positive: str | None = None):
    """Evidently accuracy and per-class precision / recall / F1 of the labelled batch rows (no reference).

    Headline precision / recall / F1 are those of ``positive`` when both classes of a binary task are present,
    a macro average over three or more classes; otherwise (Evidently would pick a positive class itself)
    only accuracy and the per-class figures are reported.
    """
    from evidently import Dataset, Report
    from evidently.core.datasets import BinaryClassification, MulticlassClassification
    from evidently.metrics import Accuracy
    from evidently.presets import ClassificationPreset, ClassificationQualityByLabel

    present = sorted(set(current["label"]) | set(current["prediction"]), key=classes.index)
    if len(present) == 2:  # Evidently treats exactly two observed values as a binary task
        pos_label = positive if positive in present else present[1]  # without a positive class: no headline
        task = BinaryClassification(target="label", prediction_labels="prediction", pos_label=pos_label)
    else:
        task = MulticlassClassification(target="label", prediction_labels="prediction")
    headline = positive in present if len(present) == 2 else len(present) > 2
    metrics = [ClassificationPreset()] if headline else [Accuracy(), ClassificationQualityByLabel()]
    definition = _definition([], ["label", "prediction"], [task])
    data = current[["label", "prediction"]].astype(str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's undefined-precision warnings for absent classes
        return Report(metrics).run(Dataset.from_pandas(data, data_definition=definition), None)
