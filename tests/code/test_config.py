"""params.yaml -> typed config: the shipped file is valid and bad values fail with clear messages."""

from pathlib import Path

import pytest
import yaml

from medflow.config import ConfigError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.active_models and all(m in p.models for m in p.active_models)
    assert abs(p.split.train + p.split.val + p.split.test - 1) < 1e-9


def _raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_ratios_must_sum_to_one():
    raw = _raw()
    raw["split"]["test"] = 0.5
    with pytest.raises(ConfigError, match=r"split.*must be 1.0"):
        parse_params(raw)
    with pytest.raises(ConfigError, match=r"split.folds is 0 \(no cross-validation folds\) or at least 2, got 1"):
        parse_params({"split": {"folds": 1}})


def test_unknown_key_is_named():
    raw = _raw()
    raw["ingest"]["imgsize"] = 3
    with pytest.raises(ConfigError, match=r"ingest\.imgsize"):
        parse_params(raw)


def test_active_model_must_exist():
    raw = _raw()
    raw["active_models"] = ["nope"]
    with pytest.raises(ConfigError, match="nope"):
        parse_params(raw)


def test_custom_window_needs_level_and_width():
    raw = _raw()
    raw["data"]["dicom"]["window"] = "custom"
    with pytest.raises(ConfigError, match="custom"):
        parse_params(raw)


def test_bad_regex_is_reported():
    raw = _raw()
    raw["data"]["group_pattern"] = "(unclosed"
    with pytest.raises(ConfigError, match="group_pattern"):
        parse_params(raw)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_unknown_model_lookup():
    p = load_params(ROOT / "params.yaml")
    with pytest.raises(ConfigError, match="unknown model"):
        p.model("does_not_exist")


def test_champion_metric_is_checked_when_params_load():
    """A metric evaluation does not compute stops at load time, not after every model has trained."""
    raw = _raw()
    raw["evaluate"]["champion_metric"] = "f1"
    with pytest.raises(ConfigError, match=r"evaluate\.champion_metric: Input should be 'accuracy'"):
        parse_params(raw)
    raw["evaluate"]["champion_metric"] = "qwk"
    with pytest.raises(ConfigError, match=r"qwk .* ordered grades only; set data\.ordered: true"):
        parse_params(raw)
    raw["evaluate"]["champion_metric"] = "macro_f1"
    raw.setdefault("monitor", {})["degradation_metrics"] = ["accuracy", "qwk"]
    with pytest.raises(ConfigError, match=r"monitor\.degradation_metrics: qwk .* set data\.ordered: true"):
        parse_params(raw)
    raw["evaluate"]["champion_metric"] = "qwk"
    raw["data"] |= {"ordered": True, "labels": ["Uninfected", "Parasitized"]}
    parsed = parse_params(raw)
    assert parsed.evaluate.champion_metric == "qwk" and parsed.monitor.degradation_metrics == ["accuracy", "qwk"]


def test_unquoted_grades_are_label_text_and_the_positive_class_must_be_one():
    raw = _raw()
    raw["data"] |= {"labels": [0, 1, 2, 3, 4], "ordered": True, "label_names": {0: "normal", 4: "proliferative"}}
    raw["evaluate"]["positive_class"] = None
    data = parse_params(raw).data
    assert data.labels == ["0", "1", "2", "3", "4"] and data.label_names == {"0": "normal", "4": "proliferative"}
    raw["evaluate"]["positive_class"] = "5"
    with pytest.raises(ConfigError, match=r"evaluate\.positive_class '5' is not one of data\.labels"):
        parse_params(raw)


def test_schedules_time_zone_and_side_bounds_are_checked_when_params_load():
    raw = _raw()
    raw["retrain"] |= {"schedule_monitor": "0 2 * *", "timezone": "Mars/Base"}
    raw["validate"] |= {"min_side": 50, "max_side": 10}
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    message = str(err.value)
    assert "retrain.schedule_monitor: '0 2 * *' is not a 5-field cron expression" in message
    assert "retrain.timezone: unknown time zone 'Mars/Base'" in message
    assert "validate.min_side (50) is larger than validate.max_side (10)" in message
    raw = _raw()
    raw["retrain"] |= {"schedule_retrain": "*/15 9-17 * * mon-fri", "timezone": "Europe/Berlin"}
    assert parse_params(raw).retrain.schedule_retrain == "*/15 9-17 * * mon-fri"


def test_the_promotion_test_confidence_is_a_share_below_one_and_zero_or_null_turns_it_off():
    raw = _raw()
    assert (parse_params(raw).retrain.confidence, parse_params(raw).retrain.resamples) == (0.9, 1000)
    for off in (0, None):
        raw["retrain"]["confidence"] = off
        assert parse_params(raw).retrain.confidence is None
    raw["retrain"] |= {"confidence": 90, "resamples": 10}
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert "retrain.confidence: 90 is not in [0, 1): the one-sided confidence of the paired bootstrap test of a " \
           "promotion (e.g. 0.9); 0 or null turns the test off" in str(err.value)
    assert "retrain.resamples: Input should be greater than or equal to 100 (got 10)" in str(err.value)


def test_errors_show_the_value_found_and_a_close_key():
    raw = _raw()
    raw["trian"] = {}
    raw["models"]["basic_cnn"] |= {"epoch": 3, "learning_rate": "fast", "trainable": "block6"}
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    lines = str(err.value).splitlines()[1:]
    assert "  - trian: unknown key; did you mean 'train'? (keys here: data, ingest, validate," in "\n".join(lines)
    assert any(line.startswith("  - models.basic_cnn.epoch: unknown key; did you mean 'epochs'?") for line in lines)
    assert any(line.startswith("  - models.basic_cnn.learning_rate: ") and line.endswith("(got 'fast')")
               for line in lines)
    assert "  - models.basic_cnn.trainable: trainable takes none, all, or a list of layer-name prefixes (got " \
           "'block6'; for a prefix write [block6])" in lines
    assert len(lines) == 4


def test_yaml_on_off_and_repeated_keys(tmp_path):
    """Unquoted on/off (YAML booleans) are the documented values; a key written twice is an error."""
    assert parse_params({"train": {"mixed_precision": False}}).train.mixed_precision == "off"
    assert parse_params({"train": {"mixed_precision": True}}).train.mixed_precision == "on"
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  mixed_precision: off\n")
    assert load_params(path).train.mixed_precision == "off"
    path.write_text("train:\n  seed: 1\nsplit: {train: 0.6, val: 0.1, test: 0.3}\ntrain:\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"key 'train' appears twice in one section \(lines 1 and 4\)"):
        load_params(path)
