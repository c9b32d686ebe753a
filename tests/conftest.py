"""Shared fixtures: the embedded malaria sample and the optional ../shared folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# tests call some Prefect tasks (e.g. retraining.add_batch) outside a flow: their logs have no run to go to
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def malaria_dir() -> Path:
    """400 real NIH cell PNGs (Parasitized/ Uninfected/), shipped with the repository."""
    path = REPO / "data" / "raw" / "malaria-cells-400"
    assert path.is_dir(), f"embedded dataset missing: {path}"
    return path

