"""Prefect flows over the DVC pipeline (prefect_test_harness: a temporary local API, no telemetry).

Most tests use a small stand-in project: a dvc.yaml shaped like the real one (ingest -> train@model
-> evaluate@model -> compare) whose stage functions are monkeypatched fakes, so the orchestration is
tested in seconds. The last test runs the real pipeline on a few dozen malaria images.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="medflow-prefect-")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if str(ROOT) not in sys.path:  # flows/ lives at the repository root, beside src/
    sys.path.insert(0, str(ROOT))

from dvc.repo import Repo
from prefect.testing.utilities import prefect_test_harness

from flows import deploy, monitoring, retraining, training
from medflow import orchestrate, promote, stages
from medflow.config import ConfigError, load_params
from medflow.evaluate import compare as real_compare
from medflow.evaluate import dir_hash, params_hash
from medflow.io import sha256_file
from medflow.layout import Layout

CLASSES = ["Parasitized", "Uninfected"]
KNOBS = {"gain_per_batch": 0.05, "fail_train": None}  # steer the fake stages from a test

DVC_YAML = """
stages:
  ingest:
    cmd: medflow ingest
    deps: [data/raw/src, data/raw/extra]
    params: [data]
    outs: [data/interim/manifest.csv, data/interim/splits.csv]
  train:
    foreach: ${active_models}
    do:
      cmd: medflow train ${item}
      deps: [data/interim/manifest.csv]
      params:
        - models.${item}
      outs:
        - models/${item}
  evaluate:
    foreach: ${active_models}
    do:
      cmd: medflow evaluate ${item}
      deps:
        - models/${item}
      outs:
        - reports/eval/${item}:
            cache: false
      metrics:
        - reports/metrics/${item}.json:
            cache: false
  compare:
    cmd: medflow compare
    deps: [reports/metrics]
    params: [active_models]
    outs:
      - models/champion.json:
          cache: false
      - reports/comparison.csv:
          cache: false
  report:
    cmd: medflow report
    deps: [models/champion.json]
    outs:
      - reports/index.html:
          cache: false
"""
PARAMS = {
    "data": {"source": "data/raw/src", "group_pattern": None},
    "models": {"a": {"architecture": "basic_cnn", "epochs": 1}, "b": {"architecture": "basic_cnn", "epochs": 1}},
    "active_models": ["a", "b"],
    "retrain": {"task_retries": 1, "retry_delay_s": 0, "min_new_labelled": 100, "min_improvement": 0.01,
                "settle_s": 0},
}


# --------------------------------------------------------------------------- fake stages
def _images(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png")) if folder.exists() else []


def fake_ingest(params, layout, source=None):
    main = _images(layout.root / "data/raw/src")
    extra = _images(layout.root / "data/raw/extra")
    rows = [(p.relative_to(layout.root).as_posix(), p.parent.name) for p in main + extra]
    layout.interim.mkdir(parents=True, exist_ok=True)
    digests = [sha256_file(p) for p in main + extra]
    layout.manifest.write_text("id,label,sha256\n" + "".join(f"{i},{c},{h}\n" for (i, c), h in zip(rows, digests)))
    split = ["test" if k % 3 == 0 else "train" for k in range(len(main))] + ["train"] * len(extra)
    layout.splits.write_text("id,split,fold\n" + "".join(f"{i},{s},-1\n" for (i, _), s in zip(rows, split)))
    return {"accepted": len(rows)}


def fake_train(params, model, layout):
    calls = KNOBS.setdefault("train_calls", [])
    calls.append(model)
    fail = KNOBS["fail_train"]  # None, or calls-so-far -> exception to raise (or None)
    if fail is not None and (exc := fail(len(calls))) is not None:
        raise exc
    out = layout.model_dir(model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.keras").write_text(f"{model} trained on {layout.manifest.read_text().count(chr(10))} rows, "
                                     f"{params.models[model].epochs} epochs")
    return {"model": model}


def fake_evaluate(params, model, layout):
    extra_batches = len([p for p in (layout.root / "data/raw/extra").glob("*") if p.is_dir()])
    score = (0.70 if model == "a" else 0.60) + KNOBS["gain_per_batch"] * extra_batches
    layout.metrics(model).parent.mkdir(parents=True, exist_ok=True)
    layout.metrics(model).write_text(json.dumps({"macro_f1": score, "accuracy": score}))
    layout.eval_dir(model).mkdir(parents=True, exist_ok=True)
    per_class = {c: {"precision": score, "recall": score, "f1": score, "support": 4} for c in CLASSES}
    (layout.eval_dir(model) / "details.json").write_text(json.dumps({"per_class": per_class}))
    return {"macro_f1": score}


def fake_compare(params, layout, models=None):
    return real_compare({m: layout.metrics(m) for m in params.active_models}, layout.comparison, layout.champion,
                        metric=params.evaluate.champion_metric, data_hash=dir_hash(layout.interim),
                        params_hash=params_hash(params), meta={"classes": CLASSES, "image_size": 8, "channels": 3},
                        root=layout.root)


def fake_report(params, layout):
    """The page names the deployed version, as the real report does."""
    layout.root.joinpath("reports").mkdir(exist_ok=True)
    (layout.root / "reports/index.html").write_text(f"production: {promote.production_version(layout.root)}\n")
    return {"report": "reports/index.html"}


def _png(path: Path, seed: int) -> None:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


def _batch(folder: Path, n_per_class: int, seed: int) -> Path:
    for c in CLASSES:
        for k in range(n_per_class):
            _png(folder / c / f"{folder.name}_{c}_{k}.png", seed * 100 + k + (50 if c == CLASSES[1] else 0))
    return folder


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A DVC project with the fake pipeline: 12 images in data/raw/src, models a and b."""
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    _batch(tmp_path / "data/raw/src", 6, seed=0)
    (tmp_path / "data/raw/extra").mkdir(parents=True)
    (tmp_path / "data/raw/extra/README.md").write_text("labelled batches added by retraining\n")
    Repo.init(str(tmp_path), no_scm=True).close()
    for name, fn in [("ingest", fake_ingest), ("train", fake_train), ("evaluate", fake_evaluate),
                     ("compare", fake_compare), ("report", fake_report)]:
        monkeypatch.setattr(stages, name, fn)
    monkeypatch.setitem(KNOBS, "gain_per_batch", 0.05)
    monkeypatch.setitem(KNOBS, "fail_train", None)
    monkeypatch.setitem(KNOBS, "train_calls", [])
    return tmp_path


def _dvc_status(root: Path) -> dict:
    with orchestrate.dvc_repo(root) as repo:
        return repo.status()


def _set_param(root: Path, keys: list[str], value) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    node = raw
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw))


# --------------------------------------------------------------------------- training flow
def test_stage_list_comes_from_dvc_in_dependency_order(project):
    names = orchestrate.pipeline_stages(project)
    assert sorted(names) == sorted(["ingest", "train@a", "train@b", "evaluate@a", "evaluate@b", "compare", "report"])
    pos = names.index
    assert pos("ingest") < pos("train@a") < pos("evaluate@a") < pos("compare") < pos("report")
    assert pos("train@b") < pos("evaluate@b") < pos("compare")


def test_training_flow_runs_changed_stages_skips_the_rest_and_leaves_dvc_clean(project):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    first = training.training_flow(root=str(project))
    assert sorted(first["ran"]) == sorted(orchestrate.pipeline_stages(project)) and first["skipped"] == []
    assert _dvc_status(project) == {}
    champion = json.loads((project / "models/champion.json").read_text())
    assert champion["model"] == "a" and champion["metrics"]["macro_f1"] == pytest.approx(0.70)

    second = training.training_flow(root=str(project))
    assert second["ran"] == [] and len(second["skipped"]) == 7

    _set_param(project, ["models", "b", "epochs"], 2)  # only b's branch is affected
    third = training.training_flow(root=str(project))
    assert third["ran"] == ["train@b", "evaluate@b"]
    assert "train@a" in third["skipped"] and "ingest" in third["skipped"]
    assert _dvc_status(project) == {}
    assert "2 epochs" in (project / "models/b/model.keras").read_text()

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["medflow-comparison"])))
    assert arts and {row["model"] for row in json.loads(arts[0].data)} == {"a", "b"}


def test_transient_failure_is_retried_but_bad_config_is_not(project):
    KNOBS["fail_train"] = lambda n: OSError("disk hiccup") if n == 1 else None
    out = training.training_flow(root=str(project))
    assert KNOBS["train_calls"] == ["a", "a", "b"]  # a failed once, its retry passed
    assert "train@a" in out["ran"] and _dvc_status(project) == {}

    KNOBS["fail_train"] = lambda n: ConfigError("models.a: bad value")
    KNOBS["train_calls"].clear()
    _set_param(project, ["models", "a", "epochs"], 3)
    state = training.training_flow(root=str(project), return_state=True)
    assert state.is_failed() and KNOBS["train_calls"] == ["a"]  # not retried
    assert "train@a" in _dvc_status(project)


# --------------------------------------------------------------------------- monitoring + retraining
@pytest.fixture
def fake_monitor(monkeypatch):
    """Stand-in for medflow.monitor.run.monitor_batch (called by stages.monitor): verdict looked up by batch name."""
    import types

    from medflow.data.sources import SourceError
    from medflow.monitor.run import NoUsableImage

    verdicts: dict[str, str] = {}
    seen: list[dict] = []

    def monitor_batch(batch_source, *, champion_json, reference, out_root, params, name=None):
        seen.append({"batch": Path(batch_source).name, "champion": json.loads(Path(champion_json).read_text()),
                     "name": name})
        # what the real monitor raises when ingest finds no file, or nothing usable (loose images are quarantined)
        if not any(Path(batch_source).iterdir()):
            raise SourceError(f"{batch_source}: no images found (format folder)\nsecond line")
        if not any(f.is_file() for d in Path(batch_source).iterdir() if d.is_dir() for f in d.rglob("*")):
            loose = sum(f.is_file() for f in Path(batch_source).iterdir())
            reason = f"no usable image (all {loose} quarantined)"
            raise NoUsableImage(f"{batch_source}: {reason}; the quarantined files: ...", reason, loose)
        return {"verdict": verdicts.get(Path(batch_source).name, "ok")}

    module = types.ModuleType("medflow.monitor.run")
    module.monitor_batch = monitor_batch
    monkeypatch.setitem(sys.modules, "medflow.monitor.run", module)
    return verdicts, seen


def _initial_release(project: Path) -> str:
    """Train and promote the first production model (no batches yet)."""
    out = retraining.retraining_flow(root=str(project))
    assert out["decision"]["promote"] and out["decision"]["reason"] == "no model in production yet"
    return out["production"]


def test_drifted_labelled_batch_triggers_retraining_and_a_better_model_is_promoted(project, fake_monitor):
    verdicts, seen = fake_monitor
    v1 = _initial_release(project)
    _batch(project / "data/batches/incoming/week1", 2, seed=1)
    verdicts["week1"] = "drift"

    out = monitoring.monitoring_flow(root=str(project))  # no deployment in the harness: subflow
    assert out["verdicts"] == {"week1": "drift"} and out["retraining"] == "subflow"
    assert seen[0]["champion"]["version"] == v1  # monitored against production
    assert not (project / "data/batches/incoming/week1").exists()
    assert (project / "data/batches/processed/week1/Uninfected").is_dir()
    assert sorted(p.name for p in (project / "data/raw/extra/week1").iterdir()) == CLASSES
    assert (project / "data/raw/extra/week1.dvc").exists() and _dvc_status(project) == {}

    prod = promote.production_record(project)
    assert prod["version"] != v1 and prod["metrics"]["macro_f1"] == pytest.approx(0.75)
    # rebuilt after the promotion decision (and committed: dvc status stayed clean above)
    assert (project / "reports/index.html").read_text() == f"production: {prod['version']}\n"
    week1_md5 = yaml.safe_load((project / "data/raw/extra/week1.dvc").read_text())["outs"][0]["md5"]
    assert prod["data_version"] == {"week1": week1_md5} and week1_md5.endswith(".dir")
    reg = promote.load_registry(project)
    assert [h["version"] for h in reg["history"]] == [v1, prod["version"]]
    manifest = (project / "data/interim/manifest.csv").read_text()
    assert "data/raw/extra/week1/Parasitized/week1_Parasitized_0.png" in manifest
    assert promote.rollback(project) == v1  # one call back to the previous version


def test_a_batch_report_and_its_archive_get_one_free_name(project, fake_monitor):
    """A name taken by an earlier report (a manual `medflow monitor`) or an earlier archive is taken for both."""
    _, seen = fake_monitor
    _initial_release(project)
    (project / "reports/monitoring/week1").mkdir(parents=True)  # monitored by hand before
    (project / "data/batches/processed/week1-1").mkdir(parents=True)  # an older batch of that name
    _batch(project / "data/batches/incoming/week1", 1, seed=1)
    out = monitoring.monitoring_flow(root=str(project), trigger="none")
    assert seen[-1]["name"] == "week1-2" and out["verdicts"] == {"week1-2": "ok"}
    assert (project / "data/batches/processed/week1-2/Uninfected").is_dir()


def test_worse_challenger_is_not_promoted_and_ok_batches_do_not_retrain(project, fake_monitor):
    verdicts, _ = fake_monitor
    v1 = _initial_release(project)
    _batch(project / "data/batches/incoming/quiet", 1, seed=2)
    out = monitoring.monitoring_flow(root=str(project))
    assert out["verdicts"] == {"quiet": "ok"} and out["retraining"] is None  # 2 labelled < min_new_labelled

    KNOBS["gain_per_batch"] = -0.05  # the new data makes the model worse
    _batch(project / "data/batches/incoming/bad", 2, seed=3)
    verdicts["bad"] = "degraded"
    out = monitoring.monitoring_flow(root=str(project))
    assert out["retraining"] == "subflow"
    last = json.loads((project / promote.LAST_DECISION).read_text())
    assert not last["decision"]["promote"] and last["decision"]["delta"] == pytest.approx(-0.10)
    assert promote.production_version(project) == v1


def test_retraining_compares_with_the_model_in_use_when_nothing_was_deployed(project, fake_monitor):
    """Before a first promotion serve uses models/champion.json; retraining adopts it before overwriting it."""
    training.training_flow(root=str(project))
    in_use = json.loads((project / "models/champion.json").read_text())
    assert promote.production_version(project) is None
    _batch(project / "data/batches/processed/week1", 2, seed=1)
    out = retraining.retraining_flow(root=str(project))
    history = promote.load_registry(project)["history"]
    assert history[0]["version"] == in_use["version"] and history[0]["reason"].startswith("adopted")
    assert out["decision"]["champion"] == pytest.approx(in_use["metrics"]["macro_f1"])
    assert out["decision"]["promote"] and out["production"] != in_use["version"]
    assert promote.rollback(project) == in_use["version"]


def test_failed_retraining_leaves_production_untouched(project, fake_monitor):
    v1 = _initial_release(project)
    registry = (project / "models/registry.json").read_text()
    _batch(project / "data/batches/processed/week2", 2, seed=4)
    KNOBS["fail_train"] = lambda n: ConfigError("models.a: broken")
    state = retraining.retraining_flow(root=str(project), return_state=True)
    assert state.is_failed()
    assert promote.production_version(project) == v1
    assert (project / "models/registry.json").read_text() == registry
    assert [p.name for p in (project / "models/versions").iterdir()] == [v1]


def _write_champion(root: Path, classes: list[str], where: str = "models/champion.json") -> None:
    (root / where).parent.mkdir(parents=True, exist_ok=True)
    (root / where).write_text(json.dumps({"model": "a", "classes": classes}))


def _dicom_bytes(seed: int) -> bytes:
    """Enough of a DICOM file for content sniffing: 128-byte preamble + ``DICM`` (no file suffix needed)."""
    return bytes(128) + b"DICM" + bytes([seed]) * 16


def test_labelled_classes_come_from_production_then_last_champion_then_params_then_meta(project):
    assert retraining.labelled_classes(project)[0] is None
    (project / "data/processed").mkdir(parents=True)
    (project / "data/processed/meta.json").write_text(json.dumps({"classes": ["m1", "m2"]}))
    assert retraining.labelled_classes(project)[0] == ["m1", "m2"]
    _set_param(project, ["data", "labels"], ["p1", "p2"])
    assert retraining.labelled_classes(project)[0] == ["p1", "p2"]
    _write_champion(project, ["c1", "c2"])
    assert retraining.labelled_classes(project) == (["c1", "c2"], str(project / "models/champion.json"))
    _write_champion(project, CLASSES, where="models/production/champion.json")
    assert retraining.labelled_classes(project)[0] == CLASSES
    assert Layout(project).deployed_champion == project / "models/production/champion.json"  # the same record


def test_only_the_champions_class_folders_count_and_are_added(project, caplog):
    _write_champion(project, CLASSES)
    batch = _batch(project / "data/batches/processed/wk", 2, seed=5)  # 2 x 2 labelled
    for k in range(3):
        _png(batch / "unlabelled" / f"u{k}.png", seed=600 + k)
    _png(batch / "unlabelled/deeper/u9.png", seed=609)
    cfg = promote.retrain_config(load_params(project / "params.yaml"))
    with caplog.at_level("INFO"):
        assert retraining.pending_batches(project, cfg) == {"wk": 4}  # not 8: unlabelled/ is not a class
    assert "4 image(s) in {'unlabelled': 4} ignored for retraining" in caplog.text

    out = retraining.add_batch(str(project), "wk")
    dest = project / "data/raw/extra/wk"
    assert sorted(p.name for p in dest.iterdir()) == CLASSES
    copied = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert copied == sorted(p.relative_to(batch).as_posix() for c in CLASSES for p in (batch / c).iterdir())
    assert len(copied) == 4 and out["md5"].endswith(".dir") and (project / "data/raw/extra/wk.dvc").exists()
    assert retraining.pending_batches(project, cfg) == {}  # added: no longer pending


def test_images_already_in_training_or_unusable_are_not_added_again(project, caplog):
    """A batch dropped twice (archived as wk and wk-1) is trained on once; files the monitor quarantined
    neither count towards the retrain trigger nor are copied."""
    _write_champion(project, CLASSES)
    fake_ingest(None, Layout(project))  # the manifest: what the last pipeline run trained on
    processed = project / "data/batches/processed"
    first = _batch(processed / "wk", 2, seed=5)
    shutil.copytree(first, processed / "wk-1")
    shutil.copy(project / "data/raw/src" / CLASSES[0] / f"src_{CLASSES[0]}_0.png", first / CLASSES[0] / "old.png")
    (first / CLASSES[1] / "broken.png").write_bytes(b"\x89PNG broken")
    report = Layout(project).monitoring / "wk"
    report.mkdir(parents=True)
    (report / "quarantine.csv").write_text(f"path,reason,detail\n{CLASSES[1]}/broken.png,corrupt,\n")
    cfg = promote.retrain_config(load_params(project / "params.yaml"))
    with caplog.at_level("WARNING"):
        assert retraining.pending_batches(project, cfg) == {"wk": 4}  # not old.png (in data/raw/src), not broken.png
    assert "batch wk-1 is not added to the training data: all its labelled images are already in the training " \
           "data (4) or were unusable when it was monitored (0)" in caplog.text
    assert json.loads((processed / "wk-1" / retraining.NOT_ADDED_MARKER).read_text())["already_in_training"] == 4
    with caplog.at_level("WARNING"):
        retraining.add_batch(str(project), "wk")
    assert "batch wk: 1 image(s) already in the training data and 1 unusable one(s) left out" in caplog.text
    copied = sorted(p.name for p in (project / "data/raw/extra/wk").rglob("*.png"))
    assert copied == sorted(p.name for p in (processed / "wk-1").rglob("*.png"))  # the 4 new images only
    caplog.clear()
    assert retraining.pending_batches(project, cfg) == {}  # wk added, wk-1 marked: nothing pending, no new warning
    assert "wk-1" not in caplog.text


def test_a_simulated_batch_is_never_added_to_the_training_data(project, caplog):
    """simulate-batch writes the pipeline's own test images: monitored, never trained on."""
    from medflow.monitor.simulate import SIMULATED_MARKER

    _write_champion(project, CLASSES)
    for name in ("real", "simulated"):
        _batch(project / "data/batches/processed" / name, 3, seed=7)
    (project / "data/batches/processed/simulated" / SIMULATED_MARKER).write_text("{}")
    cfg = promote.retrain_config(load_params(project / "params.yaml"))
    with caplog.at_level("WARNING"):
        assert retraining.pending_batches(project, cfg) == {"real": 6}
    assert "batch simulated was written by `medflow simulate-batch`" in caplog.text
    with pytest.raises(ValueError, match="must not reach training"):
        retraining.add_batch.fn(str(project), "simulated")
    assert not (project / "data/raw/extra/simulated").exists()


def test_add_batch_keeps_sub_folders_and_takes_what_ingest_reads(project):
    _write_champion(project, CLASSES)
    cls = project / "data/batches/processed/wk/Parasitized"
    _png(cls / "slideA/001.png", seed=1)
    _png(cls / "slideB/001.png", seed=2)  # same name, different sub-folder and bytes
    (cls / "slideB/IM0007").write_bytes(_dicom_bytes(7))  # DICOM without a suffix (ingest reads it by content)
    (cls / "notes.txt").write_text("scanned on the 3rd\n")  # not an image: left out
    (cls / ".DS_Store").write_bytes(b"junk")  # hidden: skipped
    _png(cls / ".trash/001.png", seed=3)  # in a hidden folder: skipped
    cfg = promote.retrain_config(load_params(project / "params.yaml"))
    assert retraining.pending_batches(project, cfg) == {"wk": 3}

    retraining.add_batch(str(project), "wk")
    dest = project / "data/raw/extra/wk/Parasitized"
    copied = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert sorted(copied) == ["slideA/001.png", "slideB/001.png", "slideB/IM0007"]
    for rel, data in copied.items():
        assert data == (cls / rel).read_bytes(), rel
    assert copied["slideA/001.png"] != copied["slideB/001.png"]


def test_a_bad_batch_is_moved_to_failed_and_the_others_are_still_monitored(project, fake_monitor, caplog):
    verdicts, seen = fake_monitor
    _initial_release(project)
    incoming, failed = project / "data/batches/incoming", project / "data/batches/failed"
    (incoming / "a_empty").mkdir(parents=True)  # sorted first: they used to block every later batch
    _png(incoming / "b_loose/img0.png", seed=7)  # images but no class folder
    (failed / "a_empty").mkdir(parents=True)  # name taken by an earlier failure: goes to a_empty-1
    _batch(incoming / "c_good", 1, seed=8)
    (incoming / "scans.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an archive dropped as is: named, left alone
    verdicts["c_good"] = "drift"

    with pytest.raises(monitoring.BatchesFailed, match="(?s)2 batch.*a_empty.*b_loose") as err, caplog.at_level("WARNING"):
        monitoring.monitoring_flow(root=str(project), trigger="none")
    assert "scans.zip is a file, not a batch folder: left alone" in caplog.text and (incoming / "scans.zip").exists()
    (incoming / "scans.zip").unlink()
    assert [s["batch"] for s in seen] == ["a_empty", "b_loose", "c_good"]  # ValueError: not retried
    summary = err.value.summary
    assert summary["verdicts"] == {"c_good": "drift"}
    assert summary["retrain_reasons"] == ["c_good: drift"] and summary["retraining"].startswith("not started")
    assert (project / "data/batches/processed/c_good/Parasitized").is_dir()
    assert not any(incoming.iterdir())
    assert (failed / "a_empty-1").is_dir() and (failed / "b_loose/img0.png").is_file()
    assert str(failed / "a_empty-1") in str(err.value)
    assert (failed / "a_empty-1.error.txt").read_text().startswith(f"SourceError: {incoming / 'a_empty'}: no images")
    assert (failed / "b_loose.error.txt").read_text().startswith("NoUsableImage: ")
    assert not list(failed.glob("*/*.error.txt"))  # written beside the batch, not inside it

    # Each failure is a `failed` line of the monitoring history (one-line reason, counts when known, where the
    # files went), and takes no report folder.
    monitoring_dir = Layout(project).monitoring
    history = pd.read_csv(monitoring_dir / "history.csv", dtype=str, keep_default_na=False)
    assert history["batch"].tolist() == ["a_empty", "b_loose"]  # (the fake monitor writes no line for c_good)
    assert history["verdict"].tolist() == ["failed", "failed"]
    assert history["reasons"].tolist() == [f"SourceError: {incoming / 'a_empty'}: no images found (format folder)",
                                           "no usable image (all 1 quarantined)"]
    assert history[["n_images", "n_quarantined"]].values.tolist() == [["", ""], ["0", "1"]]
    assert history["location"].tolist() == [f"moved to {failed / 'a_empty-1'} (see a_empty-1.error.txt there)",
                                            f"moved to {failed / 'b_loose'} (see b_loose.error.txt there)"]
    assert (history[["drift_share", "champion_version", "report", "summary"]] == "").all().all()
    assert sorted(p.name for p in monitoring_dir.iterdir()) == ["history.csv"]

    out = monitoring.monitoring_flow(root=str(project), trigger="none")  # the next run is not stuck
    assert out["verdicts"] == {} and out["failed"] == {}


def test_overlapping_retraining_runs_are_rejected(project, monkeypatch):
    inside, release, results = threading.Event(), threading.Event(), {}
    slow = stages.train

    def blocking_train(params, model, layout):
        inside.set()
        release.wait(60)
        return slow(params, model, layout)

    monkeypatch.setattr(stages, "train", blocking_train)

    def run(key):
        try:
            results[key] = retraining.retraining_flow(root=str(project))
        except Exception as e:  # noqa: BLE001  (the assertion below names it)
            results[key] = e

    first = threading.Thread(target=run, args=("first",))
    first.start()
    try:
        assert inside.wait(120), "first retraining never reached training"
        run("second")
    finally:
        release.set()
        first.join(120)
    assert isinstance(results["second"], promote.RetrainBusy)
    assert results["first"]["decision"]["promote"] is True


def test_deployments_use_the_configured_schedules_and_limits(project):
    _set_param(project, ["retrain", "schedule_retrain"], "30 4 * * 1")
    specs = {s["name"]: s for s in deploy.deployment_specs(project)}
    assert set(specs) == {"training", "monitoring", "retraining"}
    assert specs["retraining"]["schedules"][0].cron == "30 4 * * 1"
    assert specs["monitoring"]["schedules"][0].cron == "0 2 * * *"
    assert specs["retraining"]["concurrency_limit"].limit == 1
    assert all(s["parameters"] == {"root": str(project)} for s in specs.values())
    assert deploy.deployment_names(list(specs.values())) == [
        "training/training", "monitoring/monitoring", "retraining/retraining"]  # what reaping looks up
    dep = specs["retraining"]["flow"].to_deployment(name="retraining", schedules=specs["retraining"]["schedules"],
                                                    concurrency_limit=specs["retraining"]["concurrency_limit"])
    assert dep.entrypoint.endswith("flows/retraining.py:retraining_flow")


# --------------------------------------------------------------------------- the real pipeline
def _tiny_project(dest: Path) -> Path:
    """The repository's dvc.yaml + src on 48 malaria images, one tiny CNN, 32 px, 1 epoch."""
    src_images = ROOT / "data/raw/malaria-cells-400"
    for cls in CLASSES:
        for f in sorted((src_images / cls).glob("*.png"))[:24]:
            (dest / "data/raw/cells" / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / "data/raw/cells" / cls / f.name)
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data/raw/extra", dest / "data/raw/extra")  # git-tracked, exists in every clone
    shutil.copy2(ROOT / "dvc.yaml", dest / "dvc.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["source"] = "data/raw/cells"
    raw["ingest"]["image_size"] = 32
    raw["validate"]["min_rows_per_class"] = 5
    raw["models"] = {"basic_cnn": {**raw["models"]["basic_cnn"], "input_size": 32, "epochs": 1, "batch_size": 8,
                                   "head_units": 16}}
    raw["active_models"] = ["basic_cnn"]
    raw["evaluate"].update(bootstrap=0, gradcam_per_class=1, misclassified_max=4)
    (dest / "params.yaml").write_text(yaml.safe_dump(raw))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    Repo.init(str(dest)).close()
    git = ["git", "-c", "user.name=medflow-test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "tiny project"], cwd=dest, check=True)  # DVCLive needs a commit
    return dest


def _lock_outs(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for st in lock.values() for o in st.get("outs", [])}


@pytest.mark.slow
def test_training_flow_matches_dvc_repro_on_real_pipeline(tmp_path):
    flow_dir = _tiny_project(tmp_path / "flow")
    repro_dir = _tiny_project(tmp_path / "repro")

    first = training.training_flow(root=str(flow_dir))
    assert first["skipped"] == [] and set(first["ran"]) == set(orchestrate.pipeline_stages(flow_dir))
    assert _dvc_status(flow_dir) == {}
    for path in ["models/basic_cnn/model.keras", "models/champion.json", "reports/comparison.csv", "reports/index.html"]:
        assert (flow_dir / path).exists(), path

    env = {**os.environ, "PATH": f"{ROOT / '.venv/bin'}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([str(ROOT / ".venv/bin/dvc"), "repro", "-q"], cwd=repro_dir, env=env, check=True)
    flow_outs, repro_outs = _lock_outs(flow_dir), _lock_outs(repro_dir)
    assert flow_outs.keys() == repro_outs.keys()  # the same artifacts, recorded the same way
    for path in ["data/interim/manifest.csv", "data/interim/pixels.npy", "data/interim/splits.csv"]:
        assert flow_outs[path] == repro_outs[path], path  # deterministic stages: byte-identical

    second = training.training_flow(root=str(flow_dir))
    assert second["ran"] == [] and set(second["skipped"]) == set(first["ran"])


def test_runs_left_running_by_a_stopped_serve_are_crashed_and_free_the_slot():
    """A killed `serve` leaves its run RUNNING, holding the limit-1 slot: the next run would wait forever."""
    from prefect.client.orchestration import get_client
    from prefect.states import Pending, Running

    dep_id = retraining.retraining_flow.to_deployment(name="retraining",
                                                      concurrency_limit=deploy.ONE_AT_A_TIME).apply()
    with get_client(sync_client=True) as client:
        orphan = client.create_flow_run_from_deployment(dep_id)
        for state in (Pending(), Running()):
            assert client.set_flow_run_state(orphan.id, state).status.value == "ACCEPT"
        waiting = client.create_flow_run_from_deployment(dep_id)
        blocked = client.set_flow_run_state(waiting.id, Pending())
        assert blocked.status.value == "REJECT" and "concurrency limit" in blocked.details.reason
        assert deploy.reap_orphaned_runs(["retraining/retraining"]) == [f"retraining/retraining: {orphan.name}"]
        assert client.read_flow_run(orphan.id).state.type.value == "CRASHED"
        assert client.read_deployment(dep_id).global_concurrency_limit.active_slots == 0
        assert client.set_flow_run_state(waiting.id, Pending()).status.value == "ACCEPT"
        assert deploy.reap_orphaned_runs(["retraining/retraining"]) == [f"retraining/retraining: {waiting.name}"]  # pending: also orphaned


def test_a_batch_still_being_copied_waits_for_the_next_run(project, fake_monitor, caplog):
    """A folder in which something changed less than retrain.settle_s ago is left in incoming/, whatever
    modification times a copy tool preserved (ctime cannot be backdated)."""
    _, seen = fake_monitor
    _set_param(project, ["retrain", "settle_s"], 3600)
    batch = project / "data/batches/incoming/arriving"
    _batch(batch, 1, seed=4)
    for f in batch.rglob("*"):
        os.utime(f, (978307200, 978307200))  # as `cp -p` of files from 2001 leaves them
    assert time.time() - monitoring.last_change(batch) < 600
    with caplog.at_level("INFO"):
        out = monitoring.monitoring_flow(root=str(project), trigger="none")
    assert out["verdicts"] == {} and not seen
    assert batch.is_dir() and "(< retrain.settle_s 3600): still being copied? Left for the next run" in caplog.text
