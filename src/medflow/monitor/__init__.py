"""Monitoring of new image batches: drift of image statistics, embeddings and predictions (Evidently),
per-class performance when labels come with the batch, and a verdict (``ok`` | ``drift`` | ``degraded``).

``MonitorConfig`` is the typed ``monitor`` section of params.yaml (see :func:`monitor_config`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class MonitorConfig(BaseModel):
    """Thresholds and statistical tests of ``medflow monitor`` (params.yaml ``monitor``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_stattest: Literal["ks", "mannw", "anderson", "cramer_von_mises", "t_test", "es"] = "ks"  # p-value tests
    cat_stattest: Literal["chisquare", "z", "fisher_exact", "g_test"] = "chisquare"  # predicted class
    feature_alpha: float = Field(0.05, gt=0, lt=1)  # a feature "drifts" when its p-value is below this
    drift_share: float = Field(0.5, gt=0, le=1)  # verdict drift when this share of all features drifts
    family_alpha: float = Field(0.01, gt=0, lt=1)  # per group (image, embedding, prediction), Bonferroni
    embedding_components: int = Field(8, ge=1, le=64)  # PCA (fitted on the reference) of the embeddings
    embedding_auc: float = Field(0.7, gt=0.5, le=1)  # Evidently domain-classifier ROC AUC that means drift
    degradation_metrics: list[Literal["accuracy", "balanced_accuracy", "macro_f1"]] = ["accuracy", "macro_f1"]
    degradation_tolerance: float = Field(0.1, ge=0, lt=1)  # degraded: batch metric < champion test - this
    min_labelled: int = Field(30, ge=1)  # fewer labelled images: no performance verdict
    max_quarantine_share: float = Field(0.1, ge=0, le=1)  # more quarantined files: drift (input quality)
    reference_max_rows: int = Field(5000, ge=100)  # reference (train split) rows used, sampled with `seed`
    seed: int = 0
    batch_size: int = Field(256, ge=1)  # prediction batch size


def monitor_config(section: MonitorConfig | dict[str, Any] | None) -> MonitorConfig:
    """The typed monitor section from ``params.monitor`` (a plain dict until config.py types it)."""
    if isinstance(section, MonitorConfig):
        return section
    if isinstance(section, BaseModel):
        section = section.model_dump()
    return MonitorConfig.model_validate(section or {})


__all__ = ["MonitorConfig", "monitor_config"]
