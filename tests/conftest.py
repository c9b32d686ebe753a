"""Shared fixtures: the embedded malaria sample and the optional ../shared folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def malaria_dir() -> Path:
    """400 real NIH cell PNGs (Parasitized/ Uninfected/), shipped with the repository."""
    path = REPO / "data" / "raw" / "malaria-cells-400"
    assert path.is_dir(), f"embedded dataset missing: {path}"
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout (datasets, weights); skips when it is not there."""
    path = (REPO / ".." / "shared").resolve()
    if not path.is_dir():
        pytest.skip(f"../shared not found at {path} (optional datasets for this test)")
    return path
