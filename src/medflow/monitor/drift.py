"""Evidently (0.7) drift and classification reports of a batch against the reference, and their values.

Every feature gets one Evidently ``ValueDrift`` p-value test (``num_stattest`` / ``cat_stattest``);
``DriftedColumnsCount`` gives the drifted share. The embedding PCs are also scored jointly by Evidently's
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


def feature_groups(pcs: list[str]) -> dict[str, list[str]]:
    """Drift-tested columns by group."""
    return {"image": list(IMAGE_FEATURES), "embedding": list(pcs), "prediction": ["prediction", "confidence"]}


def _definition(numerical: list[str], categorical: list[str], classification: list | None = None):
    from evidently import DataDefinition

    return DataDefinition(numerical_columns=numerical, categorical_columns=categorical, classification=classification)


def drift_snapshot(reference: pd.DataFrame, current: pd.DataFrame, pcs: list[str], cfg: MonitorConfig):
    """Run the drift report (current vs reference); return the Evidently snapshot."""
    from evidently import Dataset, Report
    from evidently.metrics import DriftedColumnsCount, ValueDrift

    groups = feature_groups(pcs)
    numerical = [c for g in groups.values() for c in g if c != "prediction"]
    columns = numerical + ["prediction"]
    definition = _definition(numerical, ["prediction"])
    metrics: list[Any] = [DriftedColumnsCount(columns=columns, num_method=cfg.num_stattest, cat_method=cfg.cat_stattest,
                                              threshold=cfg.feature_alpha, drift_share=cfg.drift_share)]
    metrics += [ValueDrift(column=c, method=cfg.num_stattest, threshold=cfg.feature_alpha) for c in numerical]
    metrics.append(ValueDrift(column="prediction", method=cfg.cat_stattest, threshold=cfg.feature_alpha))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Evidently's plotting internals (pandas/plotly deprecations)
        return Report(metrics).run(Dataset.from_pandas(current[columns].copy(), data_definition=definition),
                                   Dataset.from_pandas(reference[columns].copy(), data_definition=definition))


def drift_values(snapshot: Any, pcs: list[str], cfg: MonitorConfig) -> dict[str, Any]:
    """Per-feature p-values, drifted share and embedding score read back from the snapshot."""
    group_of = {c: g for g, cols in feature_groups(pcs).items() for c in cols}
    features: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for m in snapshot.dict()["metrics"]:
        kind = m["config"]["type"].rsplit(":", 1)[-1]
        if kind == "ValueDrift":
            col, p = m["config"]["column"], float(m["value"])
            features[col] = {"group": group_of[col], "test": m["config"]["method"], "p_value": p,
                             "drifted": p < cfg.feature_alpha}
        elif kind == "DriftedColumnsCount":
            out["drifted_count"] = int(m["value"]["count"])
            out["drift_share"] = float(m["value"]["share"])
    out["features"] = {c: features[c] for c in group_of if c in features}
    return out


def embedding_auc(reference: pd.DataFrame, current: pd.DataFrame, pcs: list[str], cfg: MonitorConfig) -> float:
    """ROC AUC of a classifier telling batch from reference embeddings (0.5 = indistinguishable)."""
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import (
        model as domain_classifier,
    )

    auc, _, _ = domain_classifier(threshold=cfg.embedding_auc)(current[pcs].copy(), reference[pcs].copy())
    return float(auc)


def classification_snapshot(current: pd.DataFrame, classes: list[str]):
    """Evidently accuracy and per-class precision / recall / F1 of the labelled batch rows (no reference)."""
    from evidently import Dataset, Report
    from evidently.core.datasets import BinaryClassification, MulticlassClassification
    from evidently.presets import ClassificationPreset

    present = sorted(set(current["label"]) | set(current["prediction"]), key=classes.index)
    if len(present) == 2:  # Evidently treats exactly two observed values as a binary task
        task = BinaryClassification(target="label", prediction_labels="prediction", pos_label=present[1])
    else:
        task = MulticlassClassification(target="label", prediction_labels="prediction")
    definition = _definition([], ["label", "prediction"], [task])
    data = current[["label", "prediction"]].astype(str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's undefined-precision warnings for absent classes
        return Report([ClassificationPreset()]).run(Dataset.from_pandas(data, data_definition=definition), None)
