"""The `medflow` command line: every command explains itself; bad input ends in one clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from medflow.cli import app

ROOT = Path(__file__).resolve().parents[2]
MALARIA = ROOT / "data" / "raw" / "malaria-cells-400"
runner = CliRunner()


def test_every_command_has_help() -> None:
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "ingest -> validate -> split" in top.output
    commands = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    assert len(commands) >= 16 and "simulate-batch" in commands
    for name in commands:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert f"medflow {name}" in result.output or f"root {name}" in result.output, name
        summary = result.output.split("Usage:")[1].split("╭")[0].strip().splitlines()[1:]
        assert any(line.strip() for line in summary), f"`medflow {name} --help` has no description"


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    for cls in ("Parasitized", "Uninfected"):
        (tmp_path / "cells" / cls).mkdir(parents=True)
        for f in sorted((MALARIA / cls).glob("*.png"))[:3]:
            shutil.copy(f, tmp_path / "cells" / cls / f.name)
    return tmp_path / "cells"


def test_ingest_of_an_explicit_folder_detects_its_kind(tmp_path: Path, small_tree: Path) -> None:
    """SOURCE given on the command line is read as what it is, whatever data.format the project sets."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"] |= {"source": "elsewhere/blood.npz", "format": "npz"}
    raw["ingest"] |= {"image_size": 16, "workers": 1}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["ingest", str(small_tree), "--out", str(tmp_path / "out"),
                                 "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["format"] == "folder" and summary["found"] == summary["accepted"] == 6
    assert len(pd.read_csv(tmp_path / "out" / "manifest.csv")) == 6


def test_bad_input_and_bad_config_end_in_one_message(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["ingest", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert missing.exit_code == 1 and missing.output.startswith("error: ") and "nothing" in missing.output
    (tmp_path / "params.yaml").write_text("split: {train: 0.5, val: 0.1, test: 0.1}\n")
    bad = runner.invoke(app, ["split", "--params", str(tmp_path / "params.yaml")])
    assert bad.exit_code == 2 and "must be 1.0" in bad.output and "Traceback" not in bad.output


def test_a_stage_run_before_its_inputs_exist_names_the_command_to_run(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    evaluate = runner.invoke(app, ["evaluate", "basic_cnn"])
    assert evaluate.exit_code == 1, evaluate.output
    assert "error: models/basic_cnn/model.keras not found: run `medflow train basic_cnn` first" in evaluate.output
    train = runner.invoke(app, ["train", "basic_cnn"])
    assert train.exit_code == 1 and "data/processed/meta.json not found: run `medflow preprocess` first" in train.output


def test_predict_uses_the_deployed_model_and_a_corrupt_record_is_a_clear_error(tmp_path: Path, small_tree: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --champion: models/production (what promote/rollback set), not the last run's challenger."""
    from medflow.layout import Layout

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "models" / "versions" / "v1").mkdir(parents=True)
    (tmp_path / "models" / "champion.json").write_text(json.dumps({"model": "challenger"}))
    assert Layout().deployed_champion == Path("models/champion.json")  # nothing deployed yet
    (tmp_path / "models" / "production").symlink_to(Path("versions") / "v1")
    (tmp_path / "models" / "versions" / "v1" / "champion.json").write_text("{not json")
    assert Layout().deployed_champion == Path("models/production/champion.json")
    result = runner.invoke(app, ["predict", str(small_tree), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.startswith("error: models/production/champion.json: not a champion record")


def test_predict_with_nothing_usable_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty folder or only unusable files: exit 1 naming why (the CSV of rows is still written)."""
    from serve_support import make_tiny_champion

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    champion = make_tiny_champion(tmp_path / "models" / "versions" / "v1")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    empty = runner.invoke(app, ["predict", "empty", "--out", "e.csv", "--champion", str(champion)])
    assert empty.exit_code == 1 and "error: nothing predicted from empty: 0 file(s), none usable (no image files " \
        "found)" in empty.output
    bad = runner.invoke(app, ["predict", "bad", "--out", "b.csv", "--champion", str(champion)])
    assert bad.exit_code == 1 and "1 file(s), none usable (not_an_image: 1)" in bad.output
    assert pd.read_csv("b.csv")["reason"].tolist() == ["not_an_image"]


def test_predict_warns_when_the_deployed_model_has_other_classes_than_the_latest_champion(
        tmp_path: Path, small_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from serve_support import CLASSES, make_tiny_champion

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    make_tiny_champion(tmp_path / "models" / "versions" / "v1")
    (tmp_path / "models" / "production").symlink_to(Path("versions") / "v1")
    latest = {"version": "new-1", "classes": ["normal", "pneumonia", "tuberculosis"]}
    (tmp_path / "models" / "champion.json").write_text(json.dumps(latest))
    assert CLASSES != latest["classes"]
    result = runner.invoke(app, ["predict", str(small_tree), "--out", "p.csv"])
    assert result.exit_code == 0, result.output
    assert (f"warning: the deployed model tiny_cnn-0123abcd predicts the classes {CLASSES}, but the pipeline's "
            f"latest champion new-1 has {latest['classes']}: deploy it with `medflow promote`") in result.output
    assert len(pd.read_csv("p.csv")) == 6  # still predicted, with the deployed model
    (tmp_path / "models" / "champion.json").write_text(json.dumps({**latest, "classes": CLASSES}))
    assert "warning" not in runner.invoke(app, ["predict", str(small_tree), "--out", "p.csv"]).output


def test_serve_limits_uploads_to_max_upload_mb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`medflow serve` turns params.yaml's serve.max_upload_mb into the app's byte limit (413 above it)."""
    import uvicorn
    from fastapi.testclient import TestClient
    from serve_support import make_tiny_champion

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["serve"]["max_upload_mb"] = 0.25  # 262,144 bytes
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    champion = make_tiny_champion(tmp_path / "champion")
    served: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    result = runner.invoke(app, ["serve", "--champion", str(champion), "--port", "8765",
                                 "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert served["port"] == 8765 and served["host"] == raw["serve"]["host"]
    with TestClient(served["app"]) as client:
        over = client.post("/predict", files={"file": ("big.png", b"\0" * 262_145, "image/png")})
        assert over.status_code == 413 and over.json()["reason"] == "upload_too_large"
        assert "limit of 262144 bytes" in over.json()["detail"]
        under = client.post("/predict", files={"file": ("small.png", b"\0" * 200_000, "image/png")})
        assert under.status_code == 415 and under.json()["reason"] == "not_an_image"  # read, then rejected by content


def test_bad_data_ends_in_one_message_not_a_traceback(tmp_path: Path, small_tree: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A split that leaves val/test empty, a class with no training images, a split tree with a stray folder
    and unusable .npz arrays: each is `error: ...` and exit code 1."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    interim = tmp_path / "data" / "interim"
    interim.mkdir(parents=True)

    def fails(args: list[str], *expected: str) -> None:
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert result.output.startswith("error: "), result.output
        for text in expected:
            assert text in result.output, (text, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)

    pd.DataFrame({"id": ["a.png", "b.png"], "label": ["x", "y"], "group": ["p1", "p1"], "pixel_hash": ["h1", "h2"],
                  "source_split": ""}).to_csv(interim / "manifest.csv", index=False)
    fails(["split"], "error: split: no rows in val/test", "1 independent groups")
    rows = [(f"{s}/{c}/{i}.png", c, s) for s in ("train", "val", "test") for c in ("x", "y") for i in range(3)
            if not (c == "y" and s == "train")]
    pd.DataFrame({"id": [r[0] for r in rows], "label": [r[1] for r in rows], "group": [r[0] for r in rows],
                  "pixel_hash": [r[0] for r in rows], "source_split": [r[2] for r in rows]}
                 ).to_csv(interim / "manifest.csv", index=False)
    fails(["split"], "class 'y' has no training images (train 0, val 3, test 3)")

    tree = tmp_path / "tree"
    for split in ("train", "test", "holdout"):
        shutil.copytree(small_tree, tree / split)
    fails(["ingest", str(tree), "--out", "out"], "['test', 'train'] are split names but ['holdout'] are not")
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((28, 28), np.uint8), np.zeros((20, 24), np.uint8)
    np.savez(tmp_path / "ragged.npz", train_images=ragged, train_labels=np.array([0, 1]))
    fails(["ingest", "ragged.npz", "--out", "out"], "object array: images of different sizes cannot be stored")
    np.savez(tmp_path / "nolabels.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    fails(["ingest", "nolabels.npz", "--out", "out"], "key 'train_labels' is missing (keys present: ['train_images'])")


def test_version_prints_the_installed_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    installed = importlib.metadata.version("medflow")
    for flag in ("--version", "-V"):
        result = runner.invoke(app, [flag])
        assert result.exit_code == 0 and result.output == f"medflow {installed}\n", result.output

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    from medflow import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"medflow {__version__} (not installed: version from the source tree)\n"


def _models_table(output: str) -> dict[str, str]:
    """`medflow models` rows (between the header and the blank line before the legend) by model name."""
    return {line[1:].split()[0]: line for line in output.split("\n\n")[0].splitlines()[1:]}


def test_models_on_a_fresh_clone_lists_every_model_untrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    rows = _models_table(result.output)
    assert list(rows) == list(raw["models"])
    for name, line in rows.items():
        assert line.startswith("*" if name in raw["active_models"] else " ")
        assert "not trained" in line and "champion" not in line, line
    assert "test macro_f1" in result.output.splitlines()[0]
    assert "  inception_v3  " in rows["inception_v3"] and "139px" in rows["inception_v3"]  # input_size set
    assert "from mixed9" in rows["inception_v3"]


def test_models_shows_saved_size_test_metric_and_champion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read from what train/evaluate/compare write (models/<m>/model.keras, reports/metrics/<m>.json,
    models/champion.json): here fake files, no training."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    for name, size in [("basic_cnn", 2048), ("effnet_lite0_frozen", 3 * 1024 * 1024), ("effnet_lite0_finetune", 10)]:
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "model.keras").write_bytes(b"\0" * size)
    (tmp_path / "reports" / "metrics").mkdir(parents=True)
    (tmp_path / "reports" / "metrics" / "basic_cnn.json").write_text(json.dumps({"accuracy": 0.95, "macro_f1": 0.9123}))
    (tmp_path / "reports" / "metrics" / "effnet_lite0_finetune.json").write_text("{truncated")
    (tmp_path / "models" / "champion.json").write_text(json.dumps({"model": "basic_cnn", "version": "basic_cnn-1"}))
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    rows = _models_table(result.output)
    assert rows["basic_cnn"].split() == ["*", "basic_cnn", "basic_cnn", "64px", "40", "all", "2.0", "KiB", "0.912",
                                         "champion", "none", "(from", "scratch)"]
    frozen = rows["effnet_lite0_frozen"]
    assert "3.0 MiB" in frozen and "not evaluated" in frozen and "from block" not in frozen
    assert frozen.endswith("models/pretrained/efficientnet_lite0_imagenet_notop.keras")
    assert "10 B" in rows["effnet_lite0_finetune"] and "unreadable" in rows["effnet_lite0_finetune"]
    assert "from block6" in rows["effnet_lite0_finetune"]
    assert "not trained" in rows["vgg16"] and "champion" not in rows["vgg16"]


def test_models_does_not_import_tensorflow(tmp_path: Path) -> None:
    """`medflow models` stays instant: nothing it reads needs TensorFlow."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "medflow", "models", "--params",
                           str(ROOT / "params.yaml")], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "basic_cnn" in done.stdout and "tensorflow" not in done.stderr and "keras" not in done.stderr


def test_stdout_carries_only_the_json_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints made while a command runs (Keras' epoch lines) go to stderr: `medflow train m > s.json` stays JSON."""
    from medflow.cli import _run

    def noisy() -> dict:
        print("Epoch 1/2 - 1s - loss: 0.31")
        return {"model": "m", "epochs": 2}

    _run(noisy)
    out, err = capsys.readouterr()
    assert json.loads(out) == {"model": "m", "epochs": 2}
    assert "Epoch 1/2" in err
