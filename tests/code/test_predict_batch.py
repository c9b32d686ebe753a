"""`predict_paths`: folders, CSV lists, DICOM and bad files -> one CSV; batched model calls."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom.data
import pytest
from PIL import Image
from serve_support import CLASSES, make_tiny_champion, sample_pngs, sample_profile

from medflow.config import CsvSource, DataConfig, IngestConfig
from medflow.data.images import load_image_file
from medflow.data.sources import csv_records
from medflow.serve.batch import expand_inputs, predict_paths
from medflow.serve.predictor import Predictor
from medflow.serve.profile import input_warnings

PROB_COLS = [f"p_{c}" for c in CLASSES]


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_champion(tmp_path_factory.mktemp("champion"))


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    """A folder (with a subfolder, a hidden file, a text file and a truncated PNG), a CSV list, a DICOM."""
    pngs = sample_pngs(7)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for i, f in enumerate(pngs[:4]):
        shutil.copy(f, folder / ("sub" if i % 2 else "") / f.name)
    (folder / ".hidden.png").write_bytes(pngs[0].read_bytes())
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "half.png").write_bytes(pngs[4].read_bytes()[:300])
    listed = tmp_path / "listed"
    listed.mkdir()
    for f in pngs[5:]:
        shutil.copy(f, listed / f.name)
    csv = listed / "list.csv"
    # pngs[6] without its suffix: data.csv.extension adds it
    pd.DataFrame({"image": [pngs[5].name, pngs[6].stem, "gone.png"]}).to_csv(csv, index=False)
    dcm = tmp_path / "ct.dcm"
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), dcm)
    return {"folder": folder, "csv": csv, "dicom": dcm, "missing": tmp_path / "nope.png"}


def _run(inputs: dict[str, Path], champion: Path, out: Path, batch_size: int) -> tuple[dict, pd.DataFrame]:
    data_cfg = DataConfig(csv=CsvSource(extension=".png"))
    summary = predict_paths(list(inputs.values()), out, champion_json=champion, data_cfg=data_cfg,
                            ingest_cfg=IngestConfig(image_size=32), batch_size=batch_size, progress=False)
    return summary, pd.read_csv(out)


def test_predict_paths_writes_rows_for_good_and_bad_files(inputs, champion: Path, tmp_path: Path, monkeypatch) -> None:
    batch_sizes: list[int] = []
    original = Predictor.probabilities

    def counting(self: Predictor, x: np.ndarray) -> np.ndarray:
        batch_sizes.append(len(x))
        return original(self, x)

    monkeypatch.setattr(Predictor, "probabilities", counting)
    summary, df = _run(inputs, champion, tmp_path / "out" / "predictions.csv", batch_size=3)

    # folder: 4 PNGs + notes.txt + half.png (hidden file skipped); 3 CSV rows; 1 DICOM; 1 missing path.
    assert len(df) == 11 and not df["file"].str.contains(".hidden").any()
    assert list(df.columns) == ["file", "status", "reason", "detail", "predicted", "confidence", "warnings",
                                *PROB_COLS, "model_version"]
    ok, bad = df[df.status == "ok"], df[df.status == "error"]
    assert len(ok) == 7 and len(bad) == 4
    reasons = dict(zip(bad["file"].map(lambda f: Path(f).name), bad["reason"]))
    assert reasons["notes.txt"] == "not_an_image" and reasons["half.png"] in {"truncated", "corrupt"}
    assert reasons["gone.png"] == "missing_file" and reasons["nope.png"] == "missing_file"
    assert bad["detail"].notna().all() and bad["predicted"].isna().all()
    assert ok["file"].str.endswith("ct.dcm").sum() == 1

    # the CT slice is unlike the malaria cells of the training data: "; "-joined warnings; the cells have none
    warnings = dict(zip(df["file"].map(lambda f: Path(f).name), df["warnings"].fillna("")))
    ct = input_warnings(load_image_file(inputs["dicom"], DataConfig(), IngestConfig()), sample_profile())
    assert warnings.pop("ct.dcm") == "; ".join(ct) and ct[0] == "DICOM CT but the model was trained on PNG images"
    assert set(warnings.values()) == {""}
    assert summary["unlike_training_data"] == 1 and summary["input_checked"] is True

    proba = ok[PROB_COLS].to_numpy()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert (ok["predicted"] == [CLASSES[i] for i in proba.argmax(axis=1)]).all()
    np.testing.assert_allclose(ok["confidence"], proba.max(axis=1))
    assert (df["model_version"] == "tiny_cnn-0123abcd").all()

    assert summary["files"] == 11 and summary["predicted"] == 7 and summary["failed"] == 4
    assert summary["by_reason"]["missing_file"] == 2 and sum(summary["by_reason"].values()) == 4
    assert sum(summary["per_class"].values()) == 7
    # Batched: chunks of 3 files; only the readable ones of each chunk reach the model, in one call.
    assert sum(batch_sizes) == 7 and max(batch_sizes) > 1 and len(batch_sizes) <= 4


def test_batching_does_not_change_results(inputs, champion: Path, tmp_path: Path) -> None:
    _, batched = _run(inputs, champion, tmp_path / "b64.csv", batch_size=64)
    _, single = _run(inputs, champion, tmp_path / "b1.csv", batch_size=1)
    pd.testing.assert_series_equal(batched["status"], single["status"])
    np.testing.assert_allclose(batched[PROB_COLS].to_numpy(float), single[PROB_COLS].to_numpy(float), atol=1e-5)


def test_images_unlike_the_training_data_are_counted(champion: Path, tmp_path: Path) -> None:
    """All black, all white, grayscale and 16-bit noise: predicted, each with its warnings; a real cell has none."""
    folder = tmp_path / "odd"
    folder.mkdir()
    cell = sample_pngs(1)[0]
    shutil.copy(cell, folder / "cell.png")
    Image.open(cell).convert("L").save(folder / "grey.png")
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(folder / "black.png")
    Image.fromarray(np.full((80, 80, 3), 255, np.uint8)).save(folder / "white.png")
    noise = np.random.default_rng(0).integers(0, 65536, (80, 80), dtype=np.uint16)
    Image.fromarray(noise).save(folder / "noise16.png")
    summary = predict_paths([folder], tmp_path / "p.csv", champion_json=champion, data_cfg=DataConfig(),
                            ingest_cfg=IngestConfig(image_size=32), progress=False)
    df = pd.read_csv(tmp_path / "p.csv")
    assert (df["status"] == "ok").all()
    warned = {Path(f).name: str(w).split("; ") for f, w in zip(df["file"], df["warnings"].fillna(""))}
    grey = "grayscale (1 channel) but the model was trained on 3-channel (colour) images"
    assert warned["cell.png"] == [""] and warned["grey.png"] == [grey]
    assert warned["black.png"][0].startswith("mean brightness 0.0 outside the training range ")
    assert warned["white.png"][0].startswith("mean brightness 255 outside the training range ")
    assert warned["noise16.png"][:2] == [grey, "16-bit but the model was trained on 8-bit images"]
    assert warned["noise16.png"][2].startswith("sharpness (variance of the Laplacian) ")
    assert summary["predicted"] == 5 and summary["unlike_training_data"] == 4


def test_a_record_without_input_profile_checks_nothing(inputs, tmp_path: Path) -> None:
    champion = make_tiny_champion(tmp_path / "old", profile=False)
    summary, df = _run(inputs, champion, tmp_path / "p.csv", batch_size=4)
    assert summary["predicted"] == 7 and df["warnings"].isna().all()
    assert summary["unlike_training_data"] == 0 and summary["input_checked"] is False


def test_csv_lists_name_the_files_ingest_reads(champion: Path, tmp_path: Path) -> None:
    """A dotted name without the extension, whitespace around names, ``NA`` as a name, a ``.tsv`` list."""
    images = tmp_path / "listed" / "img"
    images.mkdir(parents=True)
    for f, name in zip(sample_pngs(3), ["scan.001.png", "NA.png", "b.png"]):
        shutil.copy(f, images / name)
    csv = images.parent / "list.csv"  # no label column: a plain list to predict
    pd.DataFrame({"file": [" scan.001 ", "NA", "b.png", ""]}).to_csv(csv, index=False)
    tsv = images.parent / "labelled.tsv"
    tsv.write_text("file\tlevel\nscan.001\t0\nNA \t1\nb\t1\n")
    csv_cfg = CsvSource(image_column="file", image_dir="img", extension=".png")
    data_cfg = DataConfig(csv=csv_cfg)

    expected = [images / "NA.png", images / "b.png", images / "scan.001.png"]  # ingest's natural order
    assert expand_inputs([csv], data_cfg) == expected
    assert expand_inputs([tsv], data_cfg) == expected
    assert [Path(r.file) for r in csv_records(tsv, csv_cfg.model_copy(update={"label_column": "level"}), None)] == expected
    summary = predict_paths([csv, tsv], tmp_path / "p.csv", champion_json=champion, data_cfg=data_cfg,
                            ingest_cfg=IngestConfig(image_size=32), progress=False)
    assert summary["files"] == 6 and summary["predicted"] == 6


def test_missing_champion_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="champion"):
        predict_paths([tmp_path], tmp_path / "p.csv", champion_json=tmp_path / "champion.json",
                      data_cfg=DataConfig(), ingest_cfg=IngestConfig())
