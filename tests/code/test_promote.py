"""Promotion rule, registry, atomic production swap, rollback and the retraining lock (no Prefect, no TF)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from medflow import promote as pm

CLASSES = ["Parasitized", "Uninfected"]


def _candidate(root: Path, version: str, f1: float, *, per_class: dict | None = None, test_hash: str = "T1",
               metric: str = "macro_f1") -> dict:
    """A challenger as load_candidate returns it, with its model file written under models/<name>/."""
    name = version.split("-")[0]
    model = root / "models" / name / "model.keras"
    model.parent.mkdir(parents=True, exist_ok=True)
    model.write_bytes(f"weights of {version}".encode())
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    pc = per_class or {c: {"precision": f1, "recall": f1, "f1": f1, "support": 10} for c in CLASSES}
    return {"model": name, "model_path": f"models/{name}/model.keras", "classes": CLASSES, "image_size": 32,
            "channels": 3, "ordered": False, "metric": metric, "metrics": {"macro_f1": f1, "ece": 1 - f1},
            "data_hash": "d", "params_hash": "p", "version": version, "created": "2025-01-01T00:00:00+00:00",
            "per_class": pc, "test_hash": test_hash, "data_version": {}, "model_sha256": sha}


def _rule(cand: dict, champ: dict | None) -> pm.Decision:
    return pm.decide(cand, champ, min_improvement=0.01, max_class_drop=0.05)


def test_better_challenger_is_promoted(tmp_path):
    assert _rule(_candidate(tmp_path, "a-1", 0.80), None).promote  # first model: nothing to beat
    d = _rule(_candidate(tmp_path, "a-2", 0.85), _candidate(tmp_path, "a-1", 0.80))
    assert d.promote and d.delta == pytest.approx(0.05) and (d.challenger, d.champion) == (0.85, 0.80)


@pytest.mark.parametrize("f1, why", [(0.78, "macro_f1 0.7800 vs production 0.8000 (-0.0200): a promotion needs at "
                                           "least +0.01"), (0.805, "(+0.0050): a promotion needs"), (0.80, "(+0.0000)")])
def test_worse_or_too_small_improvement_is_not_promoted(tmp_path, f1, why):
    d = _rule(_candidate(tmp_path, "a-2", f1), _candidate(tmp_path, "a-1", 0.80))
    assert not d.promote and why in d.reason


def test_class_regression_blocks_promotion(tmp_path):
    per_class = {"Parasitized": {"precision": 1.0, "recall": 1.0, "f1": 0.99, "support": 10},
                 "Uninfected": {"precision": 0.7, "recall": 0.70, "f1": 0.74, "support": 10}}
    d = _rule(_candidate(tmp_path, "a-2", 0.865, per_class=per_class), _candidate(tmp_path, "a-1", 0.80))
    assert not d.promote
    assert d.class_drops == {"Uninfected": {"recall": pytest.approx(0.10), "f1": pytest.approx(0.06)}}


def test_a_model_without_skill_is_never_promoted_and_does_not_block_its_replacement(tmp_path):
    """Always predicting the majority class (support 30 of 40) is the floor; a production model at that floor
    does not get its one perfect class protected by the class-drop guard."""
    one_class = {"Parasitized": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 10},
                 "Uninfected": {"precision": 0.75, "recall": 1.0, "f1": 6 / 7, "support": 30}}
    useless = _candidate(tmp_path, "a-1", 3 / 7, per_class=one_class)  # macro F1 of the majority predictor
    assert pm.no_skill(useless) == ("Uninfected", pytest.approx(3 / 7))
    for metric, floor in (("accuracy", 0.75), ("balanced_accuracy", 0.5), ("roc_auc", 0.5), ("qwk", 0.0)):
        assert pm.no_skill(useless | {"metric": metric}) == ("Uninfected", pytest.approx(floor))
    assert pm.no_skill(useless | {"metric": "ece"}) is None and pm.no_skill(useless | {"per_class": {}}) is None
    d = _rule(useless, None)
    assert not d.promote and d.reason == ("no skill: macro_f1 0.4286 is no better than always predicting "
                                          "'Uninfected' (0.4286)")
    balanced = {"Parasitized": {"precision": 0.6, "recall": 0.9, "f1": 0.72, "support": 10},
                "Uninfected": {"precision": 0.96, "recall": 0.8, "f1": 0.87, "support": 30}}
    better = _candidate(tmp_path, "b-2", 0.795, per_class=balanced)  # Uninfected recall drops 0.2
    d = _rule(better, useless)
    assert d.promote and d.class_drops == {}
    skilled = _candidate(tmp_path, "a-3", 0.70, per_class={**one_class, "Parasitized": {
        "precision": 1.0, "recall": 0.2, "f1": 0.33, "support": 10}})  # production with some skill: guarded
    assert not _rule(better, skilled).promote and "Uninfected" in _rule(better, skilled).class_drops


def test_version_folders_are_readable_by_the_serving_account(tmp_path):
    old = os.umask(0o022)
    try:
        pm.promote(tmp_path, _candidate(tmp_path, "a-1", 0.80))
    finally:
        os.umask(old)
    assert (tmp_path / "models/versions/a-1").stat().st_mode & 0o777 == 0o755


def test_retraining_first_adopts_the_model_in_use(tmp_path):
    """Nothing deployed: the last run's champion (what serve used) becomes production before it is replaced."""
    cand = _candidate(tmp_path, "a-1", 0.80)
    (tmp_path / "models/champion.json").write_text(json.dumps(cand))
    assert pm.adopt_current_champion(tmp_path) == "a-1" and pm.production_version(tmp_path) == "a-1"
    assert pm.load_registry(tmp_path)["history"][-1]["reason"].startswith("adopted: the model in use")
    assert pm.adopt_current_champion(tmp_path) is None  # something is deployed now
    assert pm.adopt_current_champion(tmp_path / "elsewhere") is None  # no champion record


def test_lower_is_better_metric_and_other_test_set(tmp_path):
    champ = _candidate(tmp_path, "a-1", 0.80, metric="ece")  # ece 0.20
    assert _rule(_candidate(tmp_path, "a-2", 0.85, metric="ece"), champ).promote  # ece 0.15: better
    assert not _rule(_candidate(tmp_path, "a-3", 0.75, metric="ece"), champ).promote
    d = _rule(_candidate(tmp_path, "a-4", 0.95, test_hash="T2"), _candidate(tmp_path, "a-1", 0.80))
    assert not d.promote and "test set differs" in d.reason


def test_a_changed_champion_metric_still_compares_and_rounding_noise_does_not_refuse(tmp_path):
    champ = _candidate(tmp_path, "a-1", 0.80)
    champ["metrics"]["balanced_accuracy"] = 0.80  # production was chosen on macro_f1; every metric is recorded
    cand = _candidate(tmp_path, "a-2", 0.95, metric="balanced_accuracy")
    cand["metrics"]["balanced_accuracy"] = 0.95
    d = _rule(cand, champ)
    assert d.promote and d.delta == pytest.approx(0.15)
    # one more correct test image of 200 is an improvement of exactly 0.005 (0.004999999999999999 in floats)
    old, new = _candidate(tmp_path, "a-3", 112 / 200), _candidate(tmp_path, "a-4", 113 / 200)
    assert 113 / 200 - 112 / 200 < 0.005
    assert pm.decide(new, old, min_improvement=0.005, max_class_drop=1.0).promote


def test_promote_registers_and_swaps_production(tmp_path):
    v1 = pm.promote(tmp_path, _candidate(tmp_path, "a-1", 0.80), reason="first")
    v2 = pm.promote(tmp_path, _candidate(tmp_path, "b-2", 0.90), reason="better")
    assert pm.production_version(tmp_path) == v2 == "b-2"
    prod = tmp_path / "models" / "production"
    assert prod.is_symlink() and (prod / "model.keras").read_bytes() == b"weights of b-2"
    record = json.loads((prod / "champion.json").read_text())
    assert record["version"] == "b-2" and record["model_path"] == "models/production/model.keras"
    reg = pm.load_registry(tmp_path)
    assert [v["version"] for v in reg["versions"]] == [v1, v2]
    assert reg["versions"][1]["metrics"]["macro_f1"] == 0.90 and reg["versions"][1]["test_hash"] == "T1"
    assert [(h["action"], h["version"]) for h in reg["history"]] == [("promote", "a-1"), ("promote", "b-2")]
    assert pm.production_record(tmp_path)["version"] == "b-2"


def test_rollback_to_previous_and_named_version(tmp_path):
    with pytest.raises(pm.PromotionError, match="nothing is deployed yet, so there is nothing to roll back"):
        pm.rollback(tmp_path)
    for i, f1 in enumerate([0.7, 0.8, 0.9], start=1):
        pm.promote(tmp_path, _candidate(tmp_path, f"m{i}-x", f1))
    assert pm.rollback(tmp_path) == "m2-x" and pm.production_version(tmp_path) == "m2-x"
    assert pm.rollback(tmp_path) == "m1-x"
    with pytest.raises(pm.PromotionError, match="no version before"):
        pm.rollback(tmp_path)
    assert pm.rollback(tmp_path, "m3-x") == "m3-x"
    assert (tmp_path / "models/production/model.keras").read_bytes() == b"weights of m3-x"
    with pytest.raises(pm.PromotionError, match="unknown version"):
        pm.rollback(tmp_path, "nope")
    assert [h["action"] for h in pm.load_registry(tmp_path)["history"]] == ["promote"] * 3 + ["rollback"] * 3


def _as_challenger(root: Path, cand: dict) -> None:
    """Write what load_candidate reads: champion.json, the model's per-class test figures, the test split."""
    (root / "models/champion.json").write_text(json.dumps(cand))
    (root / "reports/eval" / cand["model"]).mkdir(parents=True, exist_ok=True)
    (root / "reports/eval" / cand["model"] / "details.json").write_text(json.dumps({"per_class": cand["per_class"]}))
    (root / "data/interim").mkdir(parents=True, exist_ok=True)
    (root / "data/interim/splits.csv").write_text("id,split,fold\nx0,test,-1\n")


def test_a_rolled_back_version_is_not_promoted_again_by_the_rule(tmp_path):
    """After `medflow rollback` from m2, the scheduled rule must not put m2 straight back; --force can."""
    _as_challenger(tmp_path, _candidate(tmp_path, "m0-x", 0.5))
    same_test = pm.split_fingerprint(tmp_path / "data/interim/splits.csv")
    for i, f1 in enumerate([0.7, 0.8], start=1):
        pm.promote(tmp_path, _candidate(tmp_path, f"m{i}-x", f1, test_hash=same_test))
    assert pm.rollback(tmp_path) == "m1-x"
    _as_challenger(tmp_path, _candidate(tmp_path, "m2-x", 0.8))
    kept = pm.decide_and_promote(tmp_path, pm.RetrainConfig())
    assert kept["production"] == "m1-x" and not kept["decision"]["promote"]
    assert kept["decision"]["reason"].startswith("m2-x was rolled back by hand (")
    assert "`medflow promote --force` deploys it" in kept["decision"]["reason"]
    assert pm.decide_and_promote(tmp_path, pm.RetrainConfig(), force=True)["production"] == "m2-x"


def test_a_model_without_skill_is_not_adopted(tmp_path):
    one_class = {"Parasitized": {"precision": 0.5, "recall": 1.0, "f1": 0.67, "support": 10},
                 "Uninfected": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 10}}
    _as_challenger(tmp_path, _candidate(tmp_path, "a-1", 0.33, per_class=one_class))
    with pytest.raises(pm.PromotionError, match="a-1 is not adopted as the production version: no skill"):
        pm.adopt_current_champion(tmp_path)
    assert pm.production_version(tmp_path) is None


def test_failed_swap_or_copy_leaves_production_untouched(tmp_path, monkeypatch):
    pm.promote(tmp_path, _candidate(tmp_path, "a-1", 0.80))
    before = pm.load_registry(tmp_path)
    real_replace = os.replace

    def dies_on_swap(src, dst):
        if Path(dst).name == "production":
            raise OSError("killed during the swap")
        return real_replace(src, dst)

    monkeypatch.setattr(pm.os, "replace", dies_on_swap)
    with pytest.raises(OSError, match="killed"):
        pm.promote(tmp_path, _candidate(tmp_path, "b-2", 0.90))
    monkeypatch.setattr(pm.os, "replace", real_replace)
    assert pm.production_version(tmp_path) == "a-1"
    assert (tmp_path / "models/production/model.keras").read_bytes() == b"weights of a-1"
    assert pm.load_registry(tmp_path)["history"] == before["history"]
    assert not list((tmp_path / "models").glob(".production.*"))

    cand = _candidate(tmp_path, "c-3", 0.95)
    (tmp_path / cand["model_path"]).unlink()  # the copy fails: nothing staged, nothing swapped
    with pytest.raises(pm.PromotionError, match="not found"):
        pm.promote(tmp_path, cand)
    assert pm.production_version(tmp_path) == "a-1"
    assert sorted(p.name for p in (tmp_path / "models/versions").iterdir()) == ["a-1", "b-2"]


def test_production_is_registered_even_when_killed_after_the_swap(tmp_path, monkeypatch):
    pm.promote(tmp_path, _candidate(tmp_path, "a-1", 0.80))
    real_write, calls = pm.write_json_atomic, []

    def dies_after_swap(path, obj):
        calls.append(pm.production_version(tmp_path))
        if calls[-1] == "b-2":  # the swap happened: the history entry is being written
            raise OSError("killed after the swap")
        return real_write(path, obj)

    monkeypatch.setattr(pm, "write_json_atomic", dies_after_swap)
    with pytest.raises(OSError, match="after the swap"):
        pm.promote(tmp_path, _candidate(tmp_path, "b-2", 0.90))
    assert pm.production_version(tmp_path) == "b-2" and pm.production_record(tmp_path)["version"] == "b-2"


def test_unregistered_production_or_a_changed_model_file_is_refused(tmp_path):
    pm.promote(tmp_path, _candidate(tmp_path, "a-1", 0.80))
    reg = pm.load_registry(tmp_path)
    (tmp_path / pm.REGISTRY).write_text(json.dumps({**reg, "versions": []}))  # registry lost its entry
    cand = _candidate(tmp_path, "b-2", 0.10)
    (tmp_path / "models/champion.json").write_text(json.dumps(cand))
    with pytest.raises(pm.PromotionError, match="does not list"):  # not "nothing in production yet"
        pm.decide_and_promote(tmp_path, pm.RetrainConfig())
    (tmp_path / cand["model_path"]).write_bytes(b"retrained after compare")
    with pytest.raises(pm.PromotionError, match="not the evaluated challenger"):
        pm.promote(tmp_path, cand)
    assert pm.production_version(tmp_path) == "a-1" and not (tmp_path / "models/versions/b-2").exists()


def test_decide_and_promote_reads_the_run_and_records_the_decision(tmp_path):
    cand = _candidate(tmp_path, "a-1", 0.80)
    per_class = cand.pop("per_class")
    for k in ("test_hash", "data_version"):
        cand.pop(k)
    (tmp_path / "models/champion.json").write_text(json.dumps(cand))
    (tmp_path / "reports/eval/a").mkdir(parents=True)
    (tmp_path / "reports/eval/a/details.json").write_text(json.dumps({"per_class": per_class}))
    (tmp_path / "data/interim").mkdir(parents=True)
    (tmp_path / "data/interim/splits.csv").write_text("id,split,fold\nx2,test,-1\nx1,train,-1\nx0,test,-1\n")
    out = pm.decide_and_promote(tmp_path, pm.RetrainConfig())
    assert out["decision"]["promote"] and out["production"] == "a-1"
    assert pm.production_record(tmp_path)["test_hash"] == pm.split_fingerprint(tmp_path / "data/interim/splits.csv")
    again = pm.decide_and_promote(tmp_path, pm.RetrainConfig())
    assert not again["decision"]["promote"] and "is the production version" in again["decision"]["reason"]
    assert json.loads((tmp_path / pm.LAST_DECISION).read_text())["decision"] == again["decision"]


def test_force_deploys_a_model_the_rule_cannot_compare(tmp_path):
    """A first model for a new dataset: its test set differs from production's, so only --force deploys it."""
    pm.promote(tmp_path, _candidate(tmp_path, "a-1", 0.80))
    cand = _candidate(tmp_path, "b-2", 0.70) | {"test_hash": "another test set"}
    (tmp_path / "models/champion.json").write_text(json.dumps(cand))
    refused = pm.decide_and_promote(tmp_path, pm.RetrainConfig())
    assert not refused["decision"]["promote"] and "not comparable" in refused["decision"]["reason"]
    forced = pm.decide_and_promote(tmp_path, pm.RetrainConfig(), force=True)
    assert forced["production"] == "b-2" and forced["decision"]["promote"]
    assert forced["decision"]["reason"] == "forced by hand; the rule said: test set differs from the production " \
                                           "model's: not comparable"
    assert pm.load_registry(tmp_path)["history"][-1]["reason"] == forced["decision"]["reason"]
    again = pm.decide_and_promote(tmp_path, pm.RetrainConfig(), force=True)  # already deployed: nothing to force
    assert not again["decision"]["promote"] and again["production"] == "b-2"


def test_monitoring_refuses_a_deployed_model_that_knows_other_classes(tmp_path):
    from medflow import stages
    from medflow.config import ConfigError, parse_params
    from medflow.data.shards import FORMAT, META
    from medflow.layout import Layout

    pm.promote(tmp_path, _candidate(tmp_path, "a-1", 0.80))  # deployed: classes a, b
    layout = Layout(tmp_path)
    layout.processed.mkdir(parents=True)
    (layout.processed / META).write_text(json.dumps({"format": FORMAT, "classes": ["normal", "pneumonia"]}))
    with pytest.raises(ConfigError, match=r"model a-1 knows the classes \['Parasitized', 'Uninfected'\], but the pipeline's data .* has "
                                          r"\['normal', 'pneumonia'\]: deploy a model trained on this data"):
        stages.monitor(parse_params({}), tmp_path / "batch", layout)


def test_retrain_lock_rejects_a_second_run(tmp_path):
    inside, release, errors = threading.Event(), threading.Event(), []

    def first():
        with pm.retrain_lock(tmp_path):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(10)
    try:
        with pytest.raises(pm.RetrainBusy):
            with pm.retrain_lock(tmp_path):
                errors.append("second run got the lock")
    finally:
        release.set()
        t.join()
    assert errors == []
    # free again once the first run is done; re-entrant in one thread (retraining runs the training flow)
    with pm.retrain_lock(tmp_path), pm.retrain_lock(tmp_path):
        pass


def test_retrain_config_defaults_and_validation():
    class P:
        retrain = {"min_improvement": 0.02}

    cfg = pm.retrain_config(P())
    assert cfg.min_improvement == 0.02 and cfg.schedule_retrain == "0 3 * * 0" and cfg.trigger == "auto"
    P.retrain = {"trigger": "sometimes"}
    with pytest.raises(ValueError, match="trigger"):
        pm.retrain_config(P())
