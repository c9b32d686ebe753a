"""Promotion rule, registry, atomic production swap, rollback and the retraining lock (no Prefect, no TF)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd
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


# --------------------------------------------------------------------------- paired bootstrap test
def _scored(root: Path, version: str, y, wrong, *, groups=None) -> tuple[dict, pd.DataFrame]:
    """A challenger record whose figures are evaluate's on synthetic predictions (0.8 on the true class, or on
    the other class for the images in ``wrong``), and those predictions as evaluate writes them."""
    from medflow.evaluate import compute_metrics

    y = np.asarray(y)
    pred = np.where(np.isin(np.arange(len(y)), list(wrong)), 1 - y, y)
    proba = np.where(np.eye(2)[pred] == 1, 0.8, 0.2)
    m = compute_metrics(y, proba, CLASSES, bootstrap=0)
    cand = _candidate(root, version, m["macro_f1"], per_class=m["per_class"])
    cand["metrics"] = {k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "ece")}
    ids = [f"img{i:03d}" for i in range(len(y))]
    names = np.asarray(CLASSES)
    frame = pd.DataFrame({"id": ids, "label": names[y], "pred": names[pred], "p_Parasitized": proba[:, 0],
                          "p_Uninfected": proba[:, 1], "group": list(groups) if groups is not None else ids})
    return cand, frame


def _paired(cand, champ, preds, *, confidence=0.9, max_class_drop=0.1) -> pm.Decision:
    return pm.decide(cand, champ, min_improvement=0.01, max_class_drop=max_class_drop, confidence=confidence,
                     resamples=1000, predictions=preds)


def test_a_challenger_better_by_a_wide_margin_passes_the_paired_test(tmp_path):
    y = [0, 1] * 100  # 200 test images; production wrong on 40, the challenger on 10 of those
    old, old_p = _scored(tmp_path, "a-1", y, range(0, 200, 5))
    new, new_p = _scored(tmp_path, "b-2", y, range(0, 50, 5))
    d = _paired(new, old, (new_p, old_p))
    assert d.promote and d.confidence == 0.9 and d.lower_bound > 0.1
    assert d.reason == (f"macro_f1 {new['metrics']['macro_f1']:.4f} vs production {old['metrics']['macro_f1']:.4f} "
                        f"(+{d.delta:.4f}), 90% paired-bootstrap lower bound +{d.lower_bound:.4f} > 0 (1000 resamples "
                        "of 200 test images)")
    assert d.delta == pytest.approx(new["metrics"]["macro_f1"] - old["metrics"]["macro_f1"]) and d.delta > 0.1


def test_a_gain_of_a_couple_of_images_on_a_small_test_set_is_refused_as_chance(tmp_path):
    """40 images: the challenger gets 3 right that production got wrong and 1 wrong that it got right: +0.05
    macro F1, ten times min_improvement, but 3 against 1 discordant images is what chance often gives."""
    y = [0, 1] * 20
    old, old_p = _scored(tmp_path, "a-1", y, [0, 1, 2, 3, 4, 5])
    new, new_p = _scored(tmp_path, "b-2", y, [0, 1, 2, 6])
    assert new["metrics"]["macro_f1"] - old["metrics"]["macro_f1"] == pytest.approx(0.05, abs=0.002)
    assert pm.decide(new, old, min_improvement=0.01, max_class_drop=0.1).promote  # the fixed threshold alone: yes
    d = _paired(new, old, (new_p, old_p))
    assert not d.promote and d.lower_bound <= 0
    assert d.reason == (f"macro_f1 {new['metrics']['macro_f1']:.4f} vs production {old['metrics']['macro_f1']:.4f} "
                        f"(+{d.delta:.4f}), 90% paired-bootstrap lower bound {d.lower_bound:+.4f} ≤ 0 "
                        "(1000 resamples of 40 test images): not clearly better")
    assert _paired(new, old, (new_p, old_p), confidence=0).promote  # 0 (as null): no test
    # min_improvement stays a floor of its own: a certain but tiny gain is still refused
    tiny = pm.decide(new, old, min_improvement=0.1, max_class_drop=0.1, confidence=0.9, predictions=(new_p, old_p))
    assert not tiny.promote and "a promotion needs at least +0.1" in tiny.reason and tiny.lower_bound is None


def test_without_per_image_predictions_the_fixed_rule_decides_and_says_so(tmp_path):
    y = [0, 1] * 20
    old, old_p = _scored(tmp_path, "a-1", y, [0, 1, 2, 3, 4, 5])
    new, new_p = _scored(tmp_path, "b-2", y, [0, 1, 2, 6])
    for preds, which in [((new_p, None), "production"), ((None, old_p), "the challenger"),
                         ((None, None), "either model")]:
        d = _paired(new, old, preds)
        assert d.promote and d.lower_bound is None
        assert d.reason.endswith(f"(+{d.delta:.4f}) (no per-image predictions for {which}: paired test skipped)")
    other = old_p.assign(id=[f"other{i}" for i in range(len(old_p))])  # predictions of another test set
    d = _paired(new, old, (new_p, other))
    assert d.promote and "(the per-image predictions are not on the same test images: paired test skipped)" in d.reason


def test_the_paired_test_resamples_whole_groups_when_the_predictions_have_them(tmp_path):
    """12 slides of 10 images: the challenger gets one whole slide right that production got wrong. As 120
    independent images that is a sure gain; as 12 slides, a resample misses that slide a third of the time."""
    y = [0, 1] * 60
    slides = [f"slide{i // 10}" for i in range(120)]
    old, old_p = _scored(tmp_path, "a-1", y, range(10), groups=slides)
    new, new_p = _scored(tmp_path, "b-2", y, [], groups=slides)
    grouped = _paired(new, old, (new_p, old_p), max_class_drop=0.0)
    assert not grouped.promote and grouped.lower_bound == pytest.approx(0.0)
    assert grouped.reason.endswith("≤ 0 (1000 resamples of 12 patient/slide groups): not clearly better")
    # the challenger's groups (this run's test data) are resampled; each image its own group (evaluate's
    # default when the data has none) or no group column: images
    for frame in (new_p.assign(group=new_p["id"]), new_p.drop(columns="group")):
        images = _paired(new, old, (frame, old_p), max_class_drop=0.0)
        assert images.promote and images.lower_bound > 0.03
        assert images.reason.endswith(" > 0 (1000 resamples of 120 test images)")


def test_the_paired_test_gives_the_same_answer_for_the_same_inputs(tmp_path):
    y = [0, 1] * 30
    old, old_p = _scored(tmp_path, "a-1", y, range(0, 60, 6), groups=[f"p{i // 3}" for i in range(60)])
    new, new_p = _scored(tmp_path, "b-2", y, [0, 6, 7], groups=[f"p{i // 3}" for i in range(60)])
    first = _paired(new, old, (new_p, old_p))
    shuffled = (new_p.sample(frac=1, random_state=1), old_p.sample(frac=1, random_state=2))  # paired by id
    assert _paired(new, old, (new_p, old_p)) == first == _paired(new, old, shuffled)
    assert first.lower_bound is not None


def test_the_paired_draws_compute_metrics_as_evaluate_does():
    """The vectorised metrics of the paired test equal scikit-learn's (evaluate's _scalars) on every resample."""
    from medflow.evaluate import _metric_draws, _resamples, _scalars

    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        y = rng.integers(0, k, 45)
        proba = rng.dirichlet(np.ones(k), len(y))
        groups = [f"g{i // 3}" for i in range(len(y))]
        slow = [_scalars(y[i], proba[i], ordered=True, bins=10) for i in _resamples(len(y), groups, 40, 3)]
        for metric in ("accuracy", "balanced_accuracy", "macro_f1", "qwk", "roc_auc", "ece"):
            fast = _metric_draws(y, [proba], metric, bins=10, n=40, seed=3, groups=groups)[0]
            expected = np.array([s[metric] for s in slow], dtype=float)  # None (undefined): NaN
            np.testing.assert_allclose(fast, expected, atol=1e-12, err_msg=f"{metric}, {k} classes")


def _evaluated(root: Path, cand: dict, frame) -> None:
    """What evaluate + compare leave for load_candidate: champion.json, details.json (with the evaluated model's
    hash) and predictions.csv; the test split of ``frame``'s images."""
    from medflow.io import atomic_write_csv

    eval_dir = root / "reports/eval" / cand["model"]
    eval_dir.mkdir(parents=True, exist_ok=True)
    (root / "models/champion.json").write_text(json.dumps(cand))
    (eval_dir / "details.json").write_text(json.dumps({"per_class": cand["per_class"],
                                                       "model_sha256": cand["model_sha256"]}))
    atomic_write_csv(eval_dir / "predictions.csv", frame)
    (root / "data/interim").mkdir(parents=True, exist_ok=True)
    (root / "data/interim/splits.csv").write_text("id,split,fold\n" + "".join(f"{i},test,-1\n" for i in frame["id"]))


def test_a_promoted_version_keeps_its_predictions_for_the_next_paired_decision(tmp_path):
    cfg = pm.RetrainConfig(min_improvement=0.01, max_class_drop=0.1)
    assert cfg.confidence == 0.9 and cfg.resamples == 1000
    y = [0, 1] * 20
    first, first_p = _scored(tmp_path, "a-1", y, [0, 1, 2, 3, 4, 5])
    _evaluated(tmp_path, first, first_p)
    assert pm.decide_and_promote(tmp_path, cfg)["production"] == "a-1"
    kept = tmp_path / "models/versions/a-1/test_predictions.csv"
    assert kept.read_bytes() == (tmp_path / "reports/eval/a/predictions.csv").read_bytes()
    assert pm.production_record(tmp_path)["predictions"] == "models/versions/a-1/test_predictions.csv"
    assert json.loads((tmp_path / "models/production/champion.json").read_text())["predictions"] == \
        "models/production/test_predictions.csv"

    close, close_p = _scored(tmp_path, "b-2", y, [0, 1, 2, 6])  # evaluation of b overwrites a's predictions.csv
    _evaluated(tmp_path, close, close_p)
    out = pm.decide_and_promote(tmp_path, cfg)
    assert out["production"] == "a-1" and out["decision"]["reason"].endswith("not clearly better")
    assert json.loads((tmp_path / pm.LAST_DECISION).read_text())["decision"]["lower_bound"] <= 0
    forced = pm.decide_and_promote(tmp_path, cfg, force=True)  # --force still deploys it
    assert forced["production"] == "b-2" and forced["decision"]["reason"].startswith("forced by hand; the rule said: ")
    assert pm.rollback(tmp_path) == "a-1"

    clear, clear_p = _scored(tmp_path, "c-3", y, [])
    _evaluated(tmp_path, clear, clear_p)
    (tmp_path / "reports/eval/c/details.json").write_text(json.dumps({"per_class": clear["per_class"],
                                                                      "model_sha256": "another model file"}))
    d = pm.decide_and_promote(tmp_path, cfg)["decision"]  # predictions of another model file are not used
    assert d["promote"] and d["reason"].endswith("(no per-image predictions for the challenger: paired test skipped)")
    assert pm.production_record(tmp_path)["predictions"] is None  # nor kept


def test_registry_entries_from_before_predictions_were_kept_fall_back_to_the_fixed_rule(tmp_path):
    y = [0, 1] * 20
    old, old_p = _scored(tmp_path, "a-1", y, [0, 1, 2, 3, 4, 5])
    _evaluated(tmp_path, old, old_p)
    pm.promote(tmp_path, pm.load_candidate(tmp_path))
    reg = pm.load_registry(tmp_path)
    del reg["versions"][0]["predictions"]  # as an older medflow wrote it
    (tmp_path / pm.REGISTRY).write_text(json.dumps(reg))
    new, new_p = _scored(tmp_path, "b-2", y, [0, 1, 2, 6])
    _evaluated(tmp_path, new, new_p)
    d = pm.decide_and_promote(tmp_path, pm.RetrainConfig(min_improvement=0.01, max_class_drop=0.1))["decision"]
    assert d["promote"] and d["reason"].endswith("(no per-image predictions for production: paired test skipped)")
