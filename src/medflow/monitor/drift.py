"""Evidently (0.7) drift and classification reports of a batch against the reference, and their values.

Every feature gets one Evidently ``ValueDrift`` p-value test (``num_stattest`` / ``cat_stattest``) at its
group's Bonferroni threshold, so Evidently's per-column "drift detected" is what the verdict uses; the drifted
share counts p-values below ``feature_alpha`` (uncorrected). The embedding PCs are also scored jointly by Evidently's
embedding drift method ``model`` (a domain classifier's ROC AUC, reference vs batch), called directly:
its ``EmbeddingsDrift`` metric would add a t-SNE plot that costs more than the rest of the report.
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
    """Per-feature p-values (``drifted``: below ``feature_alpha``, uncorrected) and the drifted count and share."""
    group_of = {c: g for g, cols in feature_groups(pcs).items() for c in cols}
    features: dict[str, dict[str, Any]] = {}
    for m in snapshot.dict()["metrics"]:
        col, p = m["config"]["column"], float(m["value"])
        features[col] = {"group": group_of[col], "test": m["config"]["method"], "p_value": p,
                         "drifted": p < cfg.feature_alpha}
    count = sum(f["drifted"] for f in features.values())
    return {"drifted_count": count, "drift_share": count / len(features),
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
