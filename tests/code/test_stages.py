"""Stage wiring checks that must fire before any expensive work."""

from __future__ import annotations

import json

import pytest

from medflow import stages
from medflow.config import ConfigError, parse_params
from medflow.layout import Layout


def test_a_positive_class_the_data_lacks_stops_at_validation_not_after_training(tmp_path):
    """The default params name 'Parasitized'; a new dataset's classes are found at ingest, checked at validate."""
    layout = Layout(tmp_path)
    layout.ingest_summary.parent.mkdir(parents=True)
    layout.ingest_summary.write_text(json.dumps({"classes": ["normal", "pneumonia"]}))
    params = parse_params({"evaluate": {"positive_class": "Parasitized"}})
    with pytest.raises(ConfigError, match=r"'Parasitized' is not one of the data's classes \['normal', 'pneumonia'\]"
                                          r": set it to one of them .* or to null"):
        stages.validate(params, layout)
    assert not layout.validation_dir.exists()  # stopped before the gate ran
