"""Evaluation metrics against scikit-learn, comparison/champion record, and the evaluate stage."""

from __future__ import annotations

import hashlib
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from medflow.config import ConfigError, parse_params
from medflow.evaluate import (
    PROFILE_MARGIN,
    PROFILE_PERCENTILES,
    compare,
    compute_metrics,
    dir_hash,
    evaluate,
    file_hash,
    paired_difference,
    params_hash,
    positive_index,
    roc_table,
)
from medflow.layout import OutOfDate

CHAMPION_FIELDS = {"model", "model_path", "classes", "image_size", "channels", "ordered", "metric", "metrics",
                   "data_hash", "params_hash", "version", "created"}


def noisy_proba(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Probabilities that favour the true class but make mistakes."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(y), k)) + 1.5 * np.eye(k)[y]
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- compute_metrics
@pytest.mark.parametrize("k,ordered", [(2, False), (4, False), (5, True)])
def test_metrics_match_sklearn(k, ordered):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 150)
    p = noisy_proba(y, k, seed=1)
    pred = p.argmax(axis=1)
    classes = [f"c{i}" for i in range(k)]
    m = compute_metrics(y, p, classes, ordered=ordered, bootstrap=0, bins=10, seed=0)

    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    expected_auc = roc_auc_score(y, p[:, 1]) if k == 2 else roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert m["roc_auc"] == pytest.approx(expected_auc)
    if ordered:
        assert m["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    else:
        assert "qwk" not in m
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=list(range(k)), zero_division=0)
    for i, c in enumerate(classes):
        assert m["per_class"][c] == pytest.approx(
            {"precision": prec[i], "recall": rec[i], "f1": f1[i], "support": sup[i]})
    assert m["confusion"] == confusion_matrix(y, pred).tolist()
    assert m["n"] == 150
    json.dumps(m)  # JSON-able


def test_qwk_known_grades():
    # Hand case: true grades vs predictions off by one once -> sklearn's quadratic kappa.
    y = np.array([0, 1, 2, 2, 1, 0])
    pred = np.array([0, 1, 2, 1, 1, 0])
    p = np.eye(3)[pred] * 0.8 + 0.2 / 3
    m = compute_metrics(y, p, ["g0", "g1", "g2"], ordered=True, bootstrap=0, bins=5)
    assert m["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert 0.8 < m["qwk"] < 1.0


def test_ece_zero_for_confident_and_correct_one_hot():
    y = np.array([0, 1, 2, 1, 0])
    m = compute_metrics(y, np.eye(3)[y], ["a", "b", "c"], bootstrap=0, bins=10)
    assert m["ece"] == pytest.approx(0.0)
    assert m["accuracy"] == 1.0


def test_ece_matches_hand_computation():
    # top-label confidences 0.9, 0.9 (bin 0.8-0.9), 0.6 (bin 0.5-0.6), 0.7 (bin 0.6-0.7); 5 bins of 0.2:
    # bin [0.8,1.0]: conf 0.9, acc 1/2 ; bin [0.6,0.8): conf 0.7, acc 1 ; bin [0.4,0.6]: conf 0.6, acc 0
    y = np.array([0, 1, 1, 0])
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    expected = 2 / 4 * abs(0.5 - 0.9) + 1 / 4 * abs(0.0 - 0.6) + 1 / 4 * abs(0.0 - 0.7)
    m = compute_metrics(y, p, ["a", "b"], bootstrap=0, bins=5)
    assert m["ece"] == pytest.approx(expected)


def test_bootstrap_interval_contains_point_estimate_and_is_reproducible():
    y = np.random.default_rng(3).integers(0, 3, 200)
    p = noisy_proba(y, 3, seed=4)
    m = compute_metrics(y, p, ["a", "b", "c"], ordered=True, bootstrap=200, bins=10, seed=7)
    assert set(m["ci95"]) == {"accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "qwk", "ece"}
    for name, (lo, hi) in m["ci95"].items():
        assert lo <= m[name] <= hi, name
        assert lo < hi, name
    again = compute_metrics(y, p, ["a", "b", "c"], ordered=True, bootstrap=200, bins=10, seed=7)
    assert again["ci95"] == m["ci95"]


def test_per_class_intervals_match_scikit_learn_on_the_same_resamples():
    from sklearn.metrics import precision_recall_fscore_support

    from medflow.evaluate import _resamples

    y = np.random.default_rng(5).integers(0, 3, 90)
    p = noisy_proba(y, 3, seed=6)
    groups = [f"s{i // 3}" for i in range(90)]
    m = compute_metrics(y, p, ["a", "b", "c"], bootstrap=150, seed=11, groups=groups)
    pred = p.argmax(1)
    draws = {"precision": [], "recall": []}
    for idx in _resamples(len(y), groups, 150, 11):
        pr, rc, _, _ = precision_recall_fscore_support(y[idx], pred[idx], labels=[0, 1, 2], zero_division=np.nan)
        draws["precision"].append(pr)
        draws["recall"].append(rc)
    for i, c in enumerate("abc"):
        for name in ("precision", "recall"):
            col = np.asarray(draws[name])[:, i]
            lo, hi = m["per_class_ci95"][c][name]
            assert [lo, hi] == pytest.approx(list(np.percentile(col[~np.isnan(col)], [2.5, 97.5])))
            assert lo <= m["per_class"][c][name] <= hi
    assert compute_metrics(y, p, ["a", "b", "c"], bootstrap=0)["per_class_ci95"] == {}
    # a class the test set lacks has no recall interval (never a 0/0 turned into a number)
    rare = compute_metrics(np.array([0, 0, 1, 1]), np.array([[.9, .1, 0], [.2, .8, 0], [.1, .9, 0], [.6, .4, 0]]),
                           ["a", "b", "c"], bootstrap=50, seed=1)
    assert rare["per_class_ci95"]["c"] == {"precision": None, "recall": None}


def test_bootstrap_resamples_whole_groups():
    y = np.random.default_rng(3).integers(0, 2, 120)
    p = noisy_proba(y, 2, seed=4)
    images = compute_metrics(y, p, ["a", "b"], bootstrap=300, seed=7)
    singletons = compute_metrics(y, p, ["a", "b"], bootstrap=300, seed=7, groups=[f"g{i}" for i in range(120)])
    assert singletons["ci95"] == images["ci95"]  # one image per group: the same draws as resampling images
    assert (images["ci_unit"], singletons["ci_unit"], singletons["ci_units"]) == ("images", "groups", 120)
    # 12 slides of 10 images, each slide all right or all wrong: 12 independent units, not 120
    slide = np.repeat(np.arange(12), 10)
    right = np.isin(slide, [0, 1, 2, 3, 4, 5, 6, 7, 8])
    clustered = np.where(right[:, None], np.eye(2)[y] * 0.8 + 0.1, np.eye(2)[1 - y] * 0.8 + 0.1)
    naive = compute_metrics(y, clustered, ["a", "b"], bootstrap=300, seed=7)["ci95"]["accuracy"]
    grouped = compute_metrics(y, clustered, ["a", "b"], bootstrap=300, seed=7,
                              groups=[f"s{g}" for g in slide])["ci95"]["accuracy"]
    assert grouped[1] - grouped[0] > 1.8 * (naive[1] - naive[0])
    with pytest.raises(ValueError, match="groups has 3 entries"):
        compute_metrics(y, p, ["a", "b"], bootstrap=10, groups=["a", "b", "c"])


def test_paired_difference_of_two_models_on_the_same_images():
    y = np.random.default_rng(5).integers(0, 2, 200)
    good = noisy_proba(y, 2, seed=1)
    bad = np.random.default_rng(2).dirichlet([1, 1], len(y))  # guessing
    acc = lambda p: accuracy_score(y, p.argmax(axis=1))
    d = paired_difference(y, good, bad, "accuracy", ordered=False, bins=10, n=300, seed=0)
    assert d["difference"] == pytest.approx(acc(good) - acc(bad)) and d["difference"] > 0
    assert d["ci95"][0] <= d["difference"] <= d["ci95"][1] and d["ci95"][0] > 0 and d["share_a_better"] > 0.99
    same = paired_difference(y, good, good, "ece", ordered=False, bins=10, n=50, seed=0)
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["share_a_better"] == 0.0


def test_roc_of_the_positive_class_or_of_every_class():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55], [0.2, 0.8], [0.1, 0.9]])
    classes = ["Parasitized", "Uninfected"]
    assert positive_index(classes, None) is None and positive_index(classes, "Parasitized") == 0
    assert positive_index(["a", "b", "c"], "a") is None  # several classes: one-vs-rest curves for all
    with pytest.raises(ConfigError, match="'Infected' is not one of the data's classes"):
        positive_index(classes, "Infected")
    one = roc_table(y, p, classes, positive=0)
    fpr, tpr, _ = roc_curve(y == 0, p[:, 0])
    assert set(one["class"]) == {"Parasitized"}
    np.testing.assert_allclose(one["tpr"], tpr)
    np.testing.assert_allclose(one["fpr"], fpr)
    assert list(roc_table(y, p, classes)["class"].unique()) == classes


def test_macro_f1_leaves_out_a_class_absent_from_the_test_set_and_never_predicted():
    y = np.array([0, 0, 1, 1, 1])  # class 2 has no test image and is never predicted
    p = np.eye(3)[y] * 0.8 + 0.1
    m = compute_metrics(y, p, ["a", "b", "c"], bootstrap=50, seed=0)
    assert m["macro_f1"] == 1.0 == f1_score(y, y, average="macro")  # scikit-learn's default labels
    assert m["ci95"]["macro_f1"] == [1.0, 1.0]  # resamples missing a class do not count it as F1 = 0
    wrong = p.copy()
    wrong[0] = [0.1, 0.1, 0.8]  # predicted once: then it counts, with F1 = 0
    assert compute_metrics(y, wrong, ["a", "b", "c"], bootstrap=0)["macro_f1"] == pytest.approx(
        f1_score(y, wrong.argmax(axis=1), average="macro"))


def test_undefined_auc_is_none_and_bad_shape_rejected():
    y = np.zeros(5, int)
    m = compute_metrics(y, np.tile([0.7, 0.3], (5, 1)), ["a", "b"], bootstrap=0)
    assert m["roc_auc"] is None
    with pytest.raises(ValueError, match="N x K"):
        compute_metrics(y, np.ones((5, 3)) / 3, ["a", "b"], bootstrap=0)


# --------------------------------------------------------------------------- compare / champion
def write_metrics(tmp_path, name, **m):
    path = tmp_path / "metrics" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(m))
    return path


META = {"classes": ["Parasitized", "Uninfected"], "ordered": False, "image_size": 64, "channels": 3}


def test_champion_is_best_by_configured_metric(tmp_path):
    paths = {
        "a": write_metrics(tmp_path, "a", accuracy=0.95, macro_f1=0.80, ece=0.10, num_params=10),
        "b": write_metrics(tmp_path, "b", accuracy=0.90, macro_f1=0.90, ece=0.02, num_params=99),
        "c": write_metrics(tmp_path, "c", accuracy=0.85, macro_f1=0.85, ece=0.05, num_params=5),
    }
    (tmp_path / "models" / "b").mkdir(parents=True)
    (tmp_path / "models" / "b" / "model.keras").write_bytes(b"weights of b")
    per_class = {"Parasitized": {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 10}}
    (tmp_path / "reports" / "eval" / "b").mkdir(parents=True)
    (tmp_path / "reports" / "eval" / "b" / "details.json").write_text(json.dumps({"per_class": per_class}))
    rec = compare(paths, tmp_path / "comparison.csv", tmp_path / "champion.json", metric="macro_f1",
                  data_hash="d" * 64, params_hash="p" * 64, meta=META, root=tmp_path)
    assert rec["model"] == "b"
    saved = json.loads((tmp_path / "champion.json").read_text())
    assert CHAMPION_FIELDS <= set(saved)
    assert saved["model_path"] == "models/b/model.keras"
    assert saved["metrics"] == {**json.loads(paths["b"].read_text()), "per_class": per_class}
    assert saved["classes"] == META["classes"] and saved["image_size"] == 64 and saved["channels"] == 3
    assert saved["ordered"] is False and saved["metric"] == "macro_f1"
    assert saved["data_hash"] == "d" * 64 and saved["params_hash"] == "p" * 64
    assert saved["version"].startswith("b-") and len(saved["version"]) == len("b-") + 8
    assert saved["model_sha256"] == file_hash(tmp_path / "models" / "b" / "model.keras")
    assert "input_profile" not in saved  # no manifest given: no profile (serve and predict then check nothing)
    pd.Timestamp(saved["created"])  # ISO-8601

    table = pd.read_csv(tmp_path / "comparison.csv")
    assert table["model"].tolist() == ["b", "c", "a"]
    assert table["rank"].tolist() == [1, 2, 3] and table["champion"].tolist() == [True, False, False]

    by_acc = compare(list(paths.values()), tmp_path / "c2.csv", tmp_path / "ch2.json", metric="accuracy",
                     data_hash="d", params_hash="p", meta=META)
    assert by_acc["model"] == "a"
    by_ece = compare(paths, tmp_path / "c3.csv", tmp_path / "ch3.json", metric="ece",
                     data_hash="d", params_hash="p", meta=META)
    assert by_ece["model"] == "b"  # lower calibration error is better


def test_champion_record_holds_its_lead_over_the_runner_up(tmp_path):
    y = np.random.default_rng(5).integers(0, 2, 90)
    groups = [f"slide{i // 3}" for i in range(90)]
    probas = {"good": noisy_proba(y, 2, seed=1), "close": noisy_proba(y, 2, seed=2)}
    paths = {}
    for name, p in probas.items():
        pred = p.argmax(axis=1)
        paths[name] = write_metrics(tmp_path, name, macro_f1=f1_score(y, pred, average="macro"), num_params=1)
        (tmp_path / "reports" / "eval" / name).mkdir(parents=True)
        names = np.array(META["classes"], dtype=object)
        pd.DataFrame({"id": [f"i{i}" for i in range(90)], "label": names[y], "pred": names[pred],
                      "p_Parasitized": p[:, 0], "p_Uninfected": p[:, 1], "group": groups}).to_csv(
            tmp_path / "reports" / "eval" / name / "predictions.csv", index=False)
    rec = compare(paths, tmp_path / "c.csv", tmp_path / "ch.json", metric="macro_f1", data_hash="d",
                  params_hash="p", meta=META, root=tmp_path, bootstrap=200, seed=3)
    champion, runner_up = (rec["model"], "close") if rec["model"] == "good" else (rec["model"], "good")
    expected = paired_difference(y, probas[champion], probas[runner_up], "macro_f1", ordered=False, bins=10,
                                 n=200, seed=3, groups=groups)
    assert rec["runner_up"] == {"model": runner_up, **expected}
    assert expected["difference"] >= 0 and expected["ci95"][0] <= expected["difference"] <= expected["ci95"][1]
    assert json.loads((tmp_path / "ch.json").read_text())["runner_up"] == rec["runner_up"]


def test_ties_go_to_fewer_params_then_name(tmp_path):
    paths = {
        "zeta": write_metrics(tmp_path, "zeta", macro_f1=0.9, num_params=100),
        "beta": write_metrics(tmp_path, "beta", macro_f1=0.9, num_params=100),
        "alpha": write_metrics(tmp_path, "alpha", macro_f1=0.9, num_params=500),
        "none": write_metrics(tmp_path, "none", macro_f1=None, num_params=1),
    }
    rec = compare(paths, tmp_path / "c.csv", tmp_path / "ch.json", metric="macro_f1",
                  data_hash="d", params_hash="p", meta=META)
    assert rec["model"] == "beta"
    assert pd.read_csv(tmp_path / "c.csv")["model"].tolist() == ["beta", "zeta", "alpha", "none"]
    with pytest.raises(ValueError, match="roc_auc"):
        compare(paths, tmp_path / "c.csv", tmp_path / "ch.json", metric="roc_auc",
                data_hash="d", params_hash="p", meta=META)
    # the same balanced accuracy (110/120) from recalls 55+55 and 56+54 differs in its last bit: still a tie
    small, big = (55 / 60 + 55 / 60) / 2, (56 / 60 + 54 / 60) / 2
    assert small != big
    paths = {"big": write_metrics(tmp_path, "big", balanced_accuracy=max(small, big), num_params=500),
             "small": write_metrics(tmp_path, "small", balanced_accuracy=min(small, big), num_params=100)}
    assert compare(paths, tmp_path / "c.csv", tmp_path / "ch.json", metric="balanced_accuracy",
                   data_hash="d", params_hash="p", meta=META)["model"] == "small"


def test_compare_records_the_input_profile_of_the_train_rows(tmp_path):
    """The profile comes from the manifest's train rows only: formats, channels, bit depths, DICOM modalities
    and, per statistic, the 0.5th-99.5th percentiles widened by a quarter of their span (lo not below 0)."""
    from medflow.serve.profile import check_input

    rng = np.random.default_rng(7)
    n = 90
    png = {"format": "png", "channels": 3, "bit_depth": 8, "modality": None}
    ct = {"format": "dicom", "channels": 1, "bit_depth": 16, "modality": "CT"}
    rows = [{"id": f"t{i}", **(ct if i % 10 == 0 else png), "mean": rng.normal(120, 15),
             "std": rng.uniform(0, 10), "sharpness": rng.lognormal(7.5, 0.3)} for i in range(n)]
    # val/test/excluded rows, far out and of other kinds: not in the profile
    odd = {"format": "jpeg", "channels": 4, "bit_depth": 16, "modality": "MR", "mean": 250.0, "std": 120.0,
           "sharpness": 1e6}
    rows += [{"id": f"o{i}", **odd} for i in range(3)]
    manifest, splits = tmp_path / "manifest.csv", tmp_path / "splits.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    pd.DataFrame({"id": [r["id"] for r in rows], "split": ["train"] * n + ["val", "test", "excluded"],
                  "fold": -1}).to_csv(splits, index=False)
    paths = {"a": write_metrics(tmp_path, "a", macro_f1=0.9, num_params=1)}
    args = {"metric": "macro_f1", "data_hash": "d", "params_hash": "p", "meta": META, "root": tmp_path}
    rec = compare(paths, tmp_path / "c.csv", tmp_path / "ch.json", manifest=manifest, splits=splits, **args)

    profile = rec["input_profile"]
    assert json.loads((tmp_path / "ch.json").read_text())["input_profile"] == profile
    assert PROFILE_PERCENTILES == (0.5, 99.5) and PROFILE_MARGIN == 0.25
    train = pd.DataFrame(rows[:n])
    assert profile["rows"] == n and profile["formats"] == ["dicom", "png"] and profile["channels"] == [1, 3]
    assert profile["bit_depths"] == [8, 16] and profile["modalities"] == ["CT"]
    for stat in ("mean", "std", "sharpness"):
        lo, hi = train[stat].quantile([0.005, 0.995])  # linear interpolation between order statistics
        expected = [max(0.0, lo - 0.25 * (hi - lo)), hi + 0.25 * (hi - lo)]
        assert profile["stats"][stat] == pytest.approx(expected, abs=1e-4), stat
    assert profile["stats"]["std"][0] == 0.0  # clipped: a statistic is never negative
    assert all(lo <= train[s].min() and train[s].max() <= hi for s, (lo, hi) in profile["stats"].items())

    # every train row passes the check; the odd rows' statistics do not (their kinds: the training had
    # PNG and DICOM, grey and colour, 8 and 16 bits), nor a DICOM modality the training had none of
    assert not any(check_input(r, profile) for r in rows[:n])
    assert [w.split(" outside the training range ")[0] for w in check_input(odd, profile)] == [
        "mean brightness 250", "contrast (grey-level std) 120", "sharpness (variance of the Laplacian) 1000000"]
    assert check_input({**ct, "modality": "MR"}, profile) == ["DICOM MR but the model was trained on DICOM CT images"]
    assert check_input({**png, **train.iloc[1][["mean", "std", "sharpness"]]}, {**profile, "formats": ["dicom"]}) == [
        "PNG image but the model was trained on DICOM CT images"]
    assert check_input(odd, None) == [] and check_input(odd, {}) == []  # records without a profile
    with pytest.raises(ValueError, match="both"):
        compare(paths, tmp_path / "c.csv", tmp_path / "ch.json", manifest=manifest, **args)


def test_compare_refuses_a_model_file_changed_after_evaluate(tmp_path):
    paths = {"b": write_metrics(tmp_path, "b", macro_f1=0.9, num_params=10)}
    model = tmp_path / "models" / "b" / "model.keras"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"evaluated weights")
    (tmp_path / "reports" / "eval" / "b").mkdir(parents=True)
    (tmp_path / "reports" / "eval" / "b" / "details.json").write_text(
        json.dumps({"per_class": {}, "model_sha256": file_hash(model)}))
    args = {"metric": "macro_f1", "data_hash": "d", "params_hash": "p", "meta": META, "root": tmp_path}
    assert compare(paths, tmp_path / "c.csv", tmp_path / "ch.json", **args)["model_sha256"] == file_hash(model)
    model.write_bytes(b"retrained weights")  # `medflow train b` without evaluate
    with pytest.raises(OutOfDate, match="changed after it was evaluated"):
        compare(paths, tmp_path / "c.csv", tmp_path / "ch.json", **args)


def test_hash_helpers(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "x.bin").write_bytes(b"abc")
    (tmp_path / "d" / "sub" / "y.bin").write_bytes(b"def")
    assert file_hash(tmp_path / "d" / "x.bin") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    h = dir_hash(tmp_path / "d")
    assert h == dir_hash(tmp_path / "d")
    (tmp_path / "d" / "sub" / "y.bin").write_bytes(b"deg")
    assert dir_hash(tmp_path / "d") != h
    p1 = parse_params({"evaluate": {"bootstrap": 10}})
    assert params_hash(p1) == params_hash(parse_params({"evaluate": {"bootstrap": 10}}))
    assert params_hash(p1) != params_hash(parse_params({"evaluate": {"bootstrap": 11}}))
    # only what shapes the champion counts: not serving, monitoring or a model dvc repro does not train
    cnn = {"architecture": "basic_cnn"}
    base = parse_params({"models": {"a": cnn, "b": cnn}, "active_models": ["a"]})
    for other in ({"serve": {"port": 8001}}, {"monitor": {"drift_share": 0.9}},
                  {"models": {"a": cnn, "b": cnn | {"epochs": 99}}}):
        assert params_hash(parse_params({"models": {"a": cnn, "b": cnn}, "active_models": ["a"]} | other)) == \
            params_hash(base), other
    assert params_hash(parse_params({"models": {"a": cnn | {"epochs": 99}, "b": cnn}, "active_models": ["a"]})) != \
        params_hash(base)


# --------------------------------------------------------------------------- evaluate stage
def tiny_model(s: int):
    """Contract-shaped model (Conv2D -> 'features' -> GAP -> 'embedding' -> 'probs'): bright = class 0."""
    import keras

    inp = keras.Input((s, s, 3))
    x = keras.layers.Conv2D(2, 3, padding="same", name="conv")(inp)
    x = keras.layers.Activation("relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(2, name="embedding")(x)
    out = keras.layers.Dense(2, activation="softmax", name="probs")(x)
    model = keras.Model(inp, out)
    k = np.zeros((3, 3, 3, 2), "float32")
    k[..., 0] = 1.0 / (27 * 255.0)
    model.get_layer("conv").set_weights([k, np.array([0.0, 0.5], "float32")])
    model.get_layer("embedding").set_weights([np.eye(2, dtype="float32"), np.zeros(2, "float32")])
    model.get_layer("probs").set_weights([np.diag([40.0, 2.0]).astype("float32"), np.zeros(2, "float32")])
    return model


def fabricate(s: int, n: int = 24):
    """Bright-square images labelled 0, dark images labelled 1, with three labels flipped."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 8, (n, s, s, 3)).astype(np.uint8)  # dark noise
    labels = np.arange(n) % 2
    images[labels == 0, 4:14, 4:14, :] = 250
    labels[[0, 3, 5]] = 1 - labels[[0, 3, 5]]
    return images, labels, [f"img{i:02d}.png" for i in range(n)]


def test_evaluate_writes_every_output(tmp_path):
    s = 24
    model = tiny_model(s)
    model_dir = tmp_path / "models" / "tiny"
    model_dir.mkdir(parents=True)
    model.save(model_dir / "model.keras")
    images, labels, ids = fabricate(s)
    params = parse_params({
        "models": {"tiny": {"architecture": "basic_cnn", "batch_size": 8}},
        "evaluate": {"bootstrap": 30, "calibration_bins": 5, "gradcam_per_class": 2, "misclassified_max": 2,
                     "positive_class": "Parasitized"},
    })
    meta = {"classes": ["Parasitized", "Uninfected"], "ordered": False, "image_size": s, "channels": 3}
    metrics_json, eval_dir = tmp_path / "reports" / "metrics" / "tiny.json", tmp_path / "reports" / "eval" / "tiny"
    groups = [f"slide{i // 2}" for i in range(s)]  # two images per slide

    summary = evaluate("tiny", params, tmp_path / "processed", model_dir, metrics_json, eval_dir,
                       arrays=(images, labels, ids), meta=meta, groups=groups)

    proba = model.predict(images.astype("float32"), verbose=0)
    pred = proba.argmax(axis=1)
    flat = json.loads(metrics_json.read_text())
    assert all(isinstance(v, (int, float)) for v in flat.values())  # dvc metrics show: flat scalars
    assert flat["accuracy"] == pytest.approx(accuracy_score(labels, pred)) == pytest.approx(21 / 24)
    assert flat["roc_auc"] == pytest.approx(roc_auc_score(labels, proba[:, 1]))
    assert flat["n_test"] == 24 and flat["num_params"] == model.count_params()
    assert summary["misclassified"] == 3

    details = json.loads((eval_dir / "details.json").read_text())
    assert details["classes"] == meta["classes"]
    assert details["model_sha256"] == hashlib.sha256((model_dir / "model.keras").read_bytes()).hexdigest()
    assert details["confusion"] == confusion_matrix(labels, pred).tolist()
    assert set(details["per_class"]) == set(meta["classes"])
    assert details["ci95"]["accuracy"][0] <= flat["accuracy"] <= details["ci95"]["accuracy"][1]
    assert (details["ci_unit"], details["ci_units"]) == ("groups", 12)  # the slides are resampled

    preds = pd.read_csv(eval_dir / "predictions.csv")
    assert preds.columns.tolist() == ["id", "label", "pred", "p_Parasitized", "p_Uninfected", "group"]
    assert preds["id"].tolist() == ids and preds["group"].tolist() == groups
    np.testing.assert_allclose(preds[["p_Parasitized", "p_Uninfected"]].to_numpy(), proba, rtol=1e-5)
    conf = pd.read_csv(eval_dir / "confusion.csv")
    assert conf.columns.tolist() == ["actual", "predicted"] and len(conf) == 24
    assert (conf["actual"] != conf["predicted"]).sum() == 3
    roc = pd.read_csv(eval_dir / "roc.csv")
    assert {"fpr", "tpr", "threshold", "class"} <= set(roc.columns) and roc["tpr"].iloc[-1] == 1.0
    assert set(roc["class"]) == {"Parasitized"}  # the positive class set in params, not the second one
    fpr, tpr, _ = roc_curve(labels == 0, proba[:, 0])
    np.testing.assert_allclose(roc["tpr"], tpr)
    np.testing.assert_allclose(roc["fpr"], fpr)
    calib = pd.read_csv(eval_dir / "calibration.csv")
    assert len(calib) == 5 and calib["count"].sum() == 24
    mis = pd.read_csv(eval_dir / "misclassified.csv")
    assert len(mis) == 2 and set(mis["id"]) <= {"img00.png", "img03.png", "img05.png"}
    assert mis["confidence"].is_monotonic_decreasing
    for png in ("misclassified.png", "gradcam.png"):
        assert (eval_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_reads_the_test_split_and_its_groups_from_the_shards(tmp_path):
    from _tfrecords import make_processed

    from medflow.data import shards

    processed = make_processed(tmp_path, {"train": 6, "val": 4, "test": 10}, size=24)
    model_dir = tmp_path / "models" / "tiny"
    model_dir.mkdir(parents=True)
    tiny_model(24).save(model_dir / "model.keras")
    params = parse_params({"evaluate": {"bootstrap": 20, "gradcam_per_class": 0, "misclassified_max": 0}})
    summary = evaluate("tiny", params, processed, model_dir, tmp_path / "m.json", tmp_path / "eval")
    _, labels, ids = shards.load_arrays(processed, "test")
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv", dtype=str)
    assert summary["n_test"] == 10 and preds["id"].tolist() == ids  # the test split, not train or val
    assert preds["label"].tolist() == [["a", "b"][y] for y in labels]
    assert preds["group"].tolist() == shards.read_groups(processed, "test") == [f"slide{i[-1]}" for i in ids]
    details = json.loads((tmp_path / "eval" / "details.json").read_text())
    assert (details["ci_unit"], details["ci_units"]) == ("groups", len(set(preds["group"])))

