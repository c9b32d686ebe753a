"""Monitoring of new image batches: drift of image statistics, embeddings and predictions (Evidently),
per-class performance when labels come with the batch, and a verdict (``ok`` | ``drift`` | ``degraded``).

``MonitorConfig`` is the typed ``monitor`` section of params.yaml (see :func:`monitor_config`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from medflow.config import MonitorConfig


def monitor_config(section: MonitorConfig | dict[str, Any] | None) -> MonitorConfig:
    """The typed monitor section (``params.monitor``; a mapping is validated, e.g. in tests)."""
    if isinstance(section, MonitorConfig):
        return section
    if isinstance(section, BaseModel):
        section = section.model_dump()
    return MonitorConfig.model_validate(section or {})


__all__ = ["MonitorConfig", "monitor_config"]
