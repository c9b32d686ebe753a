"""End-to-end ingest on real data: malaria sample, every bad-input kind, CSV, MedMNIST npz, DICOM folder."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from test_images import LIMITS, encode, pil_bytes, png_with_size
from test_sources import write_medmnist

from medflow.config import CsvSource, DataConfig, IngestConfig
from medflow.data.images import decode_image, load_image_file, to_model_input
from medflow.data.ingest import ingest, process_array_batch, process_record
from medflow.data.manifest import MANIFEST_COLUMNS, QUARANTINE_COLUMNS
from medflow.data.sources import Record, SourceError, natural_key

SMALL = IngestConfig(image_size=32, workers=2)


def read_outputs(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, dict]:
    text = {c: str for c in ("id", "path", "label", "group", "source_split", "modality", "window")}
    manifest = pd.read_csv(out / "manifest.csv", dtype=text)
    quarantine = pd.read_csv(out / "quarantine.csv", keep_default_na=False)
    return manifest, quarantine, np.load(out / "pixels.npy"), json.loads((out / "ingest_summary.json").read_text())


def assert_pixels_match(manifest: pd.DataFrame, pixels: np.ndarray, root: Path, data: DataConfig | None = None) -> None:
    """Each manifest row points at its own pixels.npy row (unique, in range, in order), which holds the
    model input of that very file; rows of images quarantined after decoding are not referenced."""
    rows = manifest["row"].tolist()
    assert rows == sorted(set(rows)) and 0 <= rows[0] and rows[-1] < pixels.shape[0]
    for path, row in zip(manifest["path"], manifest["row"]):
        rgb = load_image_file(root / path, data or DataConfig(), IngestConfig()).rgb
        np.testing.assert_array_equal(pixels[row], to_model_input(rgb, pixels.shape[1], 3), err_msg=path)


def test_malaria_sample_reproducible(malaria_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summary = ingest(malaria_dir, tmp_path / "a", DataConfig(), SMALL, progress=False)
    assert "found 400 = accepted 400 + quarantined 0" in capsys.readouterr().err
    manifest, quarantine, pixels, stored = read_outputs(tmp_path / "a")
    assert stored == summary
    assert (summary["found"], summary["accepted"], summary["quarantined"]) == (400, 400, 0)
    assert summary["per_class"] == {"Parasitized": 200, "Uninfected": 200} and summary["groups"] == 148
    assert summary["ungrouped"] == 0 and summary["format"] == "folder"
    assert list(manifest.columns) == MANIFEST_COLUMNS and list(quarantine.columns) == QUARANTINE_COLUMNS
    assert pixels.shape == (400, 32, 32, 3) and pixels.dtype == np.uint8
    first = manifest.iloc[0]
    assert first["path"] == "Parasitized/C39P4thinF_original_IMG_20150622_105335_cell_16.png"
    assert (first["group"], first["format"], first["width"], first["height"], first["channels"]) == \
        ("C39P4", "png", 112, 91, 3)
    assert first["bytes"] == (malaria_dir / first["path"]).stat().st_size
    assert 0 < manifest["mean"].min() and manifest["sharpness"].min() > 0
    assert list(manifest["row"]) == list(range(400))
    for row in range(0, 400, 50):
        rgb = load_image_file(malaria_dir / manifest["path"][row], DataConfig(), SMALL).rgb
        np.testing.assert_array_equal(pixels[row], to_model_input(rgb, 32, 3))
    # byte-for-byte reproducible, whatever the thread count
    ingest(malaria_dir, tmp_path / "b", DataConfig(), IngestConfig(image_size=32, workers=1), progress=False)
    for name in ("manifest.csv", "quarantine.csv", "pixels.npy", "ingest_summary.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.fixture()
def messy_tree(malaria_dir: Path, tmp_path: Path) -> Path:
    """Class folders A/ B/ with real cells, every kind of bad input, and usable odd formats."""
    root = tmp_path / "src"
    a, b = root / "A", root / "B"
    a.mkdir(parents=True)
    b.mkdir()
    cells = sorted((malaria_dir / "Parasitized").iterdir())[:5]
    for i, cell in enumerate(cells[:4]):
        shutil.copy(cell, (a if i % 2 else b) / cell.name)
    cell = cells[0].read_bytes()
    (a / "same_label_copy.png").write_bytes(cells[1].read_bytes())  # duplicate, same label: kept
    (a / "clash.png").write_bytes(cells[4].read_bytes())  # also in B/ as a BMP: conflicting labels
    rgb = decode_image(cells[4].read_bytes(), **LIMITS).rgb
    (b / "clash_reencoded.bmp").write_bytes(encode(rgb[:, :, ::-1], ".bmp"))
    (a / "empty.png").write_bytes(b"")
    (a / "truncated.png").write_bytes(cell[: len(cell) // 2])
    corrupt = bytearray(cell)
    corrupt[200:400] = bytes(200)
    (a / "corrupt.png").write_bytes(bytes(corrupt))
    (a / "notes.jpg").write_text("not an image, despite the name\n" * 5)
    (a / "float.tiff").write_bytes(encode(np.random.default_rng(0).random((16, 16), np.float32), ".tiff"))
    cmyk = Image.fromarray(np.full((16, 16, 3), 99, np.uint8)).convert("CMYK")
    (a / "cmyk.tiff").write_bytes(pil_bytes(cmyk, "TIFF"))
    (a / "tiny.png").write_bytes(encode(np.zeros((4, 4), np.uint8), ".png"))
    (a / "wide.png").write_bytes(png_with_size(30000, 16))
    (a / "bomb.png").write_bytes(png_with_size(12000, 12000))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    bio = io.BytesIO()
    ds.save_as(bio)
    (b / "no_pixels.dcm").write_bytes(bio.getvalue())
    (root / "loose.png").write_bytes(cell)  # outside any class folder
    # usable inputs that must be converted, not rejected
    ramp16 = (np.arange(24 * 24, dtype=np.uint32).reshape(24, 24) * 113).astype(np.uint16)
    (b / "grey16.png").write_bytes(encode(ramp16, ".png"))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:10, :, 3] = 0
    (b / "rgba.png").write_bytes(pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"))
    (b / "grey.png").write_bytes(encode(rgb[..., 1], ".png"))
    shutil.copy(get_testdata_file("CT_small.dcm"), b / "ct.dcm")
    return root


def test_every_bad_input_is_quarantined_with_its_reason(messy_tree: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    summary = ingest(messy_tree, tmp_path / "out", DataConfig(), SMALL, progress=False)
    manifest, quarantine, pixels, stored = read_outputs(tmp_path / "out")
    reasons = dict(zip(quarantine["path"], quarantine["reason"]))
    assert reasons == {
        "A/bomb.png": "decompression_bomb", "A/clash.png": "conflicting_labels",
        "A/cmyk.tiff": "unsupported_channels", "A/corrupt.png": "corrupt", "A/empty.png": "empty_file",
        "A/float.tiff": "unsupported_bit_depth", "A/notes.jpg": "not_an_image", "A/tiny.png": "too_small",
        "A/truncated.png": "truncated", "A/wide.png": "too_large",
        "B/clash_reencoded.bmp": "conflicting_labels", "B/no_pixels.dcm": "no_pixel_data", "loose.png": "no_label",
    }
    assert all(quarantine["detail"].str.len() > 0)
    accepted = {"A/same_label_copy.png", "B/grey16.png", "B/rgba.png", "B/grey.png", "B/ct.dcm"}
    assert accepted <= set(manifest["path"]) and len(manifest) == 4 + len(accepted)
    assert (summary["found"], summary["accepted"], summary["quarantined"]) == (22, 9, 13)
    assert summary["found"] == summary["accepted"] + summary["quarantined"] == len(manifest) + len(quarantine)
    line = ("found 22 = accepted 9 + quarantined 13 (conflicting_labels: 2, corrupt: 1, decompression_bomb: 1, "
            "empty_file: 1, no_label: 1, no_pixel_data: 1, not_an_image: 1, too_large: 1, too_small: 1, "
            "truncated: 1, unsupported_bit_depth: 1, unsupported_channels: 1)")
    assert line in capsys.readouterr().err and stored["reconciliation"] == line and stored == summary
    rows = manifest.set_index("path")
    assert rows.loc["B/grey16.png", "bit_depth"] == 16 and rows.loc["B/grey16.png", "channels"] == 1
    assert rows.loc["B/rgba.png", "channels"] == 4 and rows.loc["B/grey.png", "channels"] == 1
    ct = rows.loc["B/ct.dcm"]
    assert (ct["format"], ct["modality"], ct["window"], ct["group"]) == ("dicom", "CT", "lung:-600/1500", "1CT1")
    assert ct["pixel_spacing"] == pytest.approx(0.661468) and ct["slice_thickness"] == 5.0
    copy_of = sorted((messy_tree / "A").glob("C*.png"))[0].relative_to(messy_tree).as_posix()
    assert rows.loc["A/same_label_copy.png", "pixel_hash"] == rows.loc[copy_of, "pixel_hash"]
    # sha256 is the file's, as `sha256sum` prints it; the pixel hash caught B/clash_reencoded.bmp above
    assert [hashlib.sha256((messy_tree / p).read_bytes()).hexdigest() for p in manifest["path"]] == \
        manifest["sha256"].tolist()
    assert_pixels_match(manifest, pixels, messy_tree)
    # 21 records reached decoding (loose.png had no label): the 10 that failed there have all-zero rows
    # (writer buffers are reused), the 2 label clashes keep their pixels but no manifest row points at them
    unused = sorted(set(range(len(pixels))) - set(manifest["row"]))
    assert len(pixels) == 21 and [bool(pixels[r].any()) for r in unused].count(False) == 10 and len(unused) == 12


def test_all_quarantined_and_empty_sources(tmp_path: Path) -> None:
    (tmp_path / "src" / "x").mkdir(parents=True)
    (tmp_path / "src" / "x" / "broken.png").write_bytes(b"")
    summary = ingest(tmp_path / "src", tmp_path / "out", DataConfig(), SMALL, progress=False)
    assert summary["reconciliation"] == "found 1 = accepted 0 + quarantined 1 (empty_file: 1)"
    assert np.load(tmp_path / "out" / "pixels.npy").shape[1:] == (32, 32, 3)
    assert pd.read_csv(tmp_path / "out" / "manifest.csv").empty
    (tmp_path / "void" / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        ingest(tmp_path / "void", tmp_path / "out2", DataConfig(), SMALL, progress=False)


def test_csv_source_diabetic_retinopathy_form(malaria_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    cells = sorted((malaria_dir / "Uninfected").iterdir())
    names = ["10_left", "10_right", "13_left", "13_right", "16_left"]
    for name, cell in zip(names, cells):
        cv2.imwrite(str(tmp_path / "train" / f"{name}.jpeg"), cv2.imread(str(cell)))
    csv = tmp_path / "trainLabels.csv"
    csv.write_text("image,level\n10_left,0\n10_right,0\n13_left,2\n13_right,4\n16_left,1\n16_left,3\n21_left,2\n")
    data = DataConfig(format="csv", labels=["0", "1", "2", "3", "4"], ordered=True,
                      csv=CsvSource(image_dir="train", extension=".jpeg"))
    summary = ingest(csv, tmp_path / "out", data, SMALL, progress=False)
    manifest, quarantine, pixels, _ = read_outputs(tmp_path / "out")
    assert summary["reconciliation"] == "found 6 = accepted 4 + quarantined 2 (conflicting_labels: 1, missing_file: 1)"
    assert dict(zip(quarantine["path"], quarantine["reason"])) == {
        "train/16_left.jpeg": "conflicting_labels", "train/21_left.jpeg": "missing_file"}
    assert list(manifest["label"]) == ["0", "0", "2", "4"] and list(manifest["group"]) == ["10", "10", "13", "13"]
    assert set(manifest["format"]) == {"jpeg"} and summary["groups"] == 2
    assert summary["classes"] == ["0", "1", "2", "3", "4"]
    assert summary["per_class"] == {"0": 2, "1": 0, "2": 1, "3": 0, "4": 1}
    assert_pixels_match(manifest, pixels, tmp_path)


def test_medmnist_npz_keeps_split_and_catches_clashes(tmp_path: Path) -> None:
    path = tmp_path / "tinymnist.npz"
    write_medmnist(path)
    with np.load(path) as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["val_images"][0] = arrays["train_images"][1]  # train:1 has label 1, val:0 label 0
    np.savez(path, **arrays)
    data = DataConfig(label_names={"0": "basophil", "1": "eosinophil", "2": "erythroblast"})
    summary = ingest(path, tmp_path / "out", data, IngestConfig(image_size=16, channels=1), progress=False)
    manifest, quarantine, pixels, _ = read_outputs(tmp_path / "out")
    assert summary["format"] == "npz" and summary["reconciliation"] == \
        "found 19 = accepted 17 + quarantined 2 (conflicting_labels: 2)"
    assert set(quarantine["path"]) == {"tinymnist.npz:train:1", "tinymnist.npz:val:0"}
    assert summary["source_splits"] == {"test": 4, "train": 11, "val": 2}
    assert summary["ungrouped"] == 17 and summary["groups"] == 17  # each image its own group
    row = manifest.set_index("path").loc["tinymnist.npz:train:2"]
    assert (row["label"], row["source_split"], row["format"], row["width"], row["channels"]) == \
        ("erythroblast", "train", "npz", 28, 3)
    assert pixels.shape == (19, 16, 16, 1)  # a row per decoded array; the 2 clashing ones are unreferenced
    order = sorted([*manifest["path"], *quarantine["path"]], key=natural_key)  # the order records are decoded in
    assert manifest["row"].tolist() == [order.index(p) for p in manifest["path"]]
    np.testing.assert_array_equal(pixels[row["row"]], to_model_input(arrays["train_images"][2], 16, 1))
    assert row["sha256"] == hashlib.sha256(arrays["train_images"][2].tobytes()).hexdigest()  # the array's bytes


def test_grey_npz(tmp_path: Path) -> None:
    write_medmnist(tmp_path / "grey.npz", grey=True)
    summary = ingest(tmp_path / "grey.npz", tmp_path / "out", DataConfig(), SMALL, progress=False)
    manifest, _, pixels, _ = read_outputs(tmp_path / "out")
    assert summary["accepted"] == 19 and set(manifest["channels"]) == {1}
    assert (pixels[..., 0] == pixels[..., 2]).all()  # grey replicated to 3 channels


def test_dicom_folder(tmp_path: Path) -> None:
    for cls, names in {"ct": ["CT_small.dcm", "693_UNCI.dcm"], "cr": ["RG1_UNCR.dcm"]}.items():
        (tmp_path / "src" / cls).mkdir(parents=True)
        for name in names:
            path = get_testdata_file(name)
            assert path is not None, f"{name} missing: pydicom-data is a dev dependency (make setup)"
            shutil.copy(path, tmp_path / "src" / cls / name)
    data = DataConfig(dicom={"window": "mediastinum"})
    summary = ingest(tmp_path / "src", tmp_path / "out", data, SMALL, progress=False)
    manifest, _, pixels, _ = read_outputs(tmp_path / "out")
    assert summary["format"] == "dicom" and summary["reconciliation"] == "found 3 = accepted 3 + quarantined 0"
    rows = manifest.set_index("path")
    unci = rows.loc["ct/693_UNCI.dcm"]
    assert (unci["modality"], unci["window"], unci["width"], unci["group"]) == \
        ("CT", "mediastinum:50/350", 512, "CQ500-CT-310")
    assert unci["pixel_spacing"] == pytest.approx(0.478516) and unci["slice_thickness"] == 5.0
    cr = rows.loc["cr/RG1_UNCR.dcm"]
    assert (cr["modality"], cr["window"], cr["label"]) == ("CR", "file:15000/30000", "cr")
    assert pd.isna(cr["pixel_spacing"]) and pd.isna(cr["slice_thickness"])  # CR: spacing 0 means unknown
    assert_pixels_match(manifest, pixels, tmp_path / "src", data)


def test_dicom_format_quarantines_other_files(malaria_dir: Path, tmp_path: Path) -> None:
    """data.format: dicom says every file is DICOM: a PNG beside the DICOM files is quarantined as not_dicom,
    not silently read as an image; format auto reads both."""
    (tmp_path / "src" / "ct").mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "src" / "ct" / "CT_small.dcm")
    shutil.copy(sorted((malaria_dir / "Uninfected").glob("*.png"))[0], tmp_path / "src" / "ct" / "cell.png")
    summary = ingest(tmp_path / "src", tmp_path / "out", DataConfig(format="dicom"), SMALL, progress=False)
    _, quarantine, _, _ = read_outputs(tmp_path / "out")
    assert summary["reconciliation"] == "found 2 = accepted 1 + quarantined 1 (not_dicom: 1)"
    assert quarantine.loc[0, "path"] == "ct/cell.png" and "a PNG image" in quarantine.loc[0, "detail"]
    auto = ingest(tmp_path / "src", tmp_path / "auto", DataConfig(), SMALL, progress=False)
    assert auto["format"] == "folder" and auto["accepted"] == 2


def test_npz_class_id_without_a_name_stops(tmp_path: Path) -> None:
    """A partial data.label_names would mix names and bare ids as labels: it stops, naming the missing ids."""
    write_medmnist(tmp_path / "tiny.npz")
    with pytest.raises(SourceError, match=r"class ids \['2'\] that data.label_names does not name"):
        ingest(tmp_path / "tiny.npz", tmp_path / "out", DataConfig(label_names={"0": "a", "1": "b"}), SMALL,
               progress=False)


def test_nothing_usable_stops_after_writing_the_quarantine(malaria_dir: Path, tmp_path: Path) -> None:
    """A source whose every file is unusable is an error (exit 1 in the CLI), and the table of reasons is there."""
    from medflow import stages
    from medflow.config import parse_params
    from medflow.layout import Layout

    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "empty.png").write_bytes(b"")
    (tmp_path / "src" / "a" / "text.png").write_bytes(b"not an image")
    params = parse_params({"data": {"source": "src"}, "ingest": {"image_size": 16, "workers": 1}})
    with pytest.raises(SourceError, match=r"no usable image \(found 2 = accepted 0 \+ quarantined 2 "
                                          r"\(empty_file: 1, not_an_image: 1\)\); .*quarantine.csv"):
        stages.ingest(params, Layout(tmp_path))
    quarantine = pd.read_csv(tmp_path / "data" / "interim" / "quarantine.csv")
    assert sorted(quarantine["reason"]) == ["empty_file", "not_an_image"]
    flat = tmp_path / "flat"  # images with no class folder: the message says where they must go
    flat.mkdir()
    shutil.copy(sorted(malaria_dir.glob("*/*.png"))[0], flat / "cell.png")
    with pytest.raises(SourceError, match=r"\(no_label: 1\)\); images must sit in class folders: SOURCE/<class>/"):
        stages.ingest(params, Layout(tmp_path), source=flat)


def test_extra_sources_are_marked_extra(malaria_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Labelled batches under data.extra_sources are ingested with the source, prefixed and marked
    ``extra`` (the split stage puts them in train without moving the source's rows)."""
    main, batch = tmp_path / "main", tmp_path / "extra" / "batch-01"
    for cls in ("Parasitized", "Uninfected"):
        (main / cls).mkdir(parents=True)
        (batch / cls).mkdir(parents=True)
        files = sorted((malaria_dir / cls).glob("*.png"))
        for f in files[:5]:
            shutil.copy(f, main / cls / f.name)
        for f in files[5:8]:
            shutil.copy(f, batch / cls / f.name)
    monkeypatch.chdir(tmp_path)
    summary = ingest(main, tmp_path / "out", DataConfig(), IngestConfig(image_size=16, workers=1),
                     extra_sources=["extra/*/", "nothing/*/"], progress=False)
    manifest, _, pixels, _ = read_outputs(tmp_path / "out")
    assert summary["found"] == summary["accepted"] == 16 and len(pixels) == 16
    extra = manifest[manifest["id"].str.startswith("extra/batch-01/")]
    assert len(extra) == 6 and set(extra["source_split"]) == {"extra"}
    assert manifest.loc[~manifest["id"].str.startswith("extra/"), "source_split"].isna().all()


def test_stage_reads_extra_sources_under_the_project_root(malaria_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect runs stages from another working directory: extra batches still resolve under the project."""
    from medflow import stages
    from medflow.config import parse_params
    from medflow.layout import Layout

    root = tmp_path / "project"
    for cls in ("Parasitized", "Uninfected"):
        files = sorted((malaria_dir / cls).glob("*.png"))
        for sub, chosen in (("data/raw/cells", files[:4]), ("data/raw/extra/b1", files[4:6])):
            (root / sub / cls).mkdir(parents=True)
            for f in chosen:
                shutil.copy(f, root / sub / cls / f.name)
    monkeypatch.chdir(tmp_path)  # not the project root
    params = parse_params({"data": {"source": "data/raw/cells", "extra_sources": ["data/raw/extra/*/"]},
                           "ingest": {"image_size": 16, "workers": 1}})
    summary = stages.ingest(params, Layout(root))
    assert summary["found"] == summary["accepted"] == 12 and summary["source_splits"] == {"extra": 4}


@pytest.mark.parametrize("shape", [(28, 28), (28, 28, 1), (28, 28, 3), (9, 40, 3)])
def test_array_batch_equals_one_by_one(shape: tuple[int, ...]) -> None:
    """The batched path for same-shaped 8-bit arrays gives exactly the per-record fields and pixels."""
    rng = np.random.default_rng(len(shape))
    arrays = rng.integers(0, 256, (12, *shape), dtype=np.uint8)
    arrays[3] = 0  # a flat image (zero variance, zero sharpness)
    recs = [Record(f"x.npz:train:{i}", "a", None, "train", array=a) for i, a in enumerate(arrays)]
    for cfg in (IngestConfig(image_size=16, channels=3), IngestConfig(image_size=48, channels=1)):
        batch = process_array_batch(recs, cfg)
        assert batch is not None and len(batch) == len(recs)
        for rec, (fields, group, small, problem) in zip(recs, batch):
            ref_fields, ref_group, ref_small, ref_problem = process_record(rec, DataConfig(), cfg)
            assert fields == ref_fields and (group, problem) == (ref_group, ref_problem) == (None, None)
            np.testing.assert_array_equal(small, ref_small)
            assert small.shape == (cfg.image_size, cfg.image_size, cfg.channels)


def test_array_batch_declines_what_it_cannot_batch() -> None:
    """Mixed shapes, 16-bit, RGBA and out-of-bounds sizes go record by record (and keep their reasons)."""
    grey = np.zeros((28, 28), np.uint8)
    for other in (np.zeros((30, 28), np.uint8), np.zeros((28, 28), np.uint16), np.zeros((28, 28, 4), np.uint8)):
        assert process_array_batch([Record("a", "x", array=grey), Record("b", "x", array=other)], SMALL) is None
    tiny = Record("t", "x", array=np.zeros((4, 4), np.uint8))
    assert process_array_batch([tiny, tiny], SMALL) is None
    assert process_record(tiny, DataConfig(), SMALL)[3][0] == "too_small"


def test_grey_alpha_is_converted_and_passes_the_default_channel_check(tmp_path: Path) -> None:
    """A grey+alpha PNG (2 channels as found) is composited to RGB and not failed by the validation gate."""
    from medflow.config import ValidateConfig
    from medflow.data.validate import ValidationFailed, validate

    grey = np.tile(np.arange(0, 240, 10, dtype=np.uint8), (24, 1))
    alpha = np.full_like(grey, 255)
    alpha[:, :6] = 0  # left quarter transparent: black after compositing
    for k, cls in enumerate(("A", "B")):  # two classes, different pixels
        (tmp_path / "src" / cls).mkdir(parents=True)
        la = np.dstack([grey + k, alpha])
        (tmp_path / "src" / cls / "la.png").write_bytes(pil_bytes(Image.fromarray(la, "LA"), "PNG"))
    ingest(tmp_path / "src", tmp_path / "out", DataConfig(), IngestConfig(image_size=24, workers=1), progress=False)
    manifest, quarantine, pixels, _ = read_outputs(tmp_path / "out")
    assert quarantine.empty and manifest["channels"].tolist() == [2, 2]
    for k, row in enumerate(manifest.sort_values("path")["row"]):
        expected = np.where(alpha > 0, grey + k, 0)
        assert all((pixels[row][..., c] == expected).all() for c in range(3))
    out = tmp_path / "validation"
    try:  # two images fail the row-count checks; the channel check is what this test is about
        validate(*(tmp_path / "out" / f for f in ("manifest.csv", "quarantine.csv", "ingest_summary.json")), out,
                 ValidateConfig(), DataConfig())
    except ValidationFailed:
        pass
    results = json.loads((out / "validation.json").read_text())["results"]
    channels = [r for r in results if r.get("column") == "channels"]
    assert channels and all(r["success"] for r in channels)


def test_images_without_a_patient_id_are_warned_about_and_the_report_says_so(
        malaria_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """data.group_pattern matching only some names: the rest become their own groups, with a warning at
    ingest, and the report does not claim that patients never cross sets."""
    from medflow.config import parse_params
    from medflow.layout import Layout
    from medflow.report import build_report

    src = tmp_path / "src"
    for cls in ("Parasitized", "Uninfected"):
        (src / cls).mkdir(parents=True)
        for i, cell in enumerate(sorted((malaria_dir / cls).iterdir())[:5]):
            shutil.copy(cell, src / cls / (cell.name if i < 3 else f"renamed_{i}.png"))  # 2 per class lose the id
    summary = ingest(src, tmp_path / "grouped", DataConfig(), SMALL, progress=False)
    err = capsys.readouterr().err
    assert summary["ungrouped"] == 4 and summary["accepted"] == 10
    assert (f"ingest: WARNING 4 of 10 images have no patient/slide id (data.group_pattern {DataConfig().group_pattern!r} "
            "matches none of their file names): each is its own group, so images of one patient or slide may land "
            "in different splits") in err
    assert "data.group_pattern to a regex" in err and "data.csv.group_column" in err and "PatientID" in err
    ingest(src, tmp_path / "none", DataConfig(group_pattern="^(?P<group>PATIENT[0-9]+)_"), SMALL, progress=False)
    assert "WARNING 10 of 10 images have no patient/slide id (data.group_pattern '^(?P<group>PATIENT[0-9]+)_' " \
           "matches no file name at all)" in capsys.readouterr().err
    ingest(malaria_dir / "Uninfected", tmp_path / "all", DataConfig(), SMALL, progress=False)  # every name matches
    assert "WARNING" not in capsys.readouterr().err
    ingest(src, tmp_path / "batch", DataConfig(), SMALL, progress=False, warn_groups=False)  # e.g. a monitored batch
    assert "WARNING" not in capsys.readouterr().err

    lay = Layout(tmp_path / "project")
    lay.interim.mkdir(parents=True)
    shutil.copy(tmp_path / "grouped" / "ingest_summary.json", lay.ingest_summary)
    lay.split_counts.parent.mkdir(parents=True)
    lay.split_counts.write_text("label,train,val,test,total\nParasitized,3,1,1,5\nUninfected,3,1,1,5\n")
    params = parse_params({"models": {"m": {"architecture": "basic_cnn"}}, "active_models": ["m"]})

    def text(section: str) -> str:
        html = build_report(lay, params).read_text()
        return " ".join(html.split(f'id="{section}"', 1)[1].split("</section>", 1)[0].split())

    assert "4 of 10 images have no patient/slide id (<em>ungrouped</em>): those were split as independent images" \
        in text("data")
    assert "so the test set measures performance on new patients" not in text("data")
    splits = text("splits")
    assert "Patients/slides never appear in more than one set" not in splits
    assert "4 images without one were split as independent images: the same patient may appear in more than one " \
           "set" in splits
    shutil.copy(tmp_path / "all" / "ingest_summary.json", lay.ingest_summary)  # every image grouped: the claim stands
    assert "Patients/slides never appear in more than one set." in text("splits")
    assert "ungrouped</em>" not in text("data") and "measures performance on new patients" in text("data")


def test_npz_and_one_shared_dicom_patient_id_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_medmnist(tmp_path / "tiny.npz")
    ingest(tmp_path / "tiny.npz", tmp_path / "npz", DataConfig(), SMALL, progress=False)
    err = capsys.readouterr().err
    assert "ingest: note: an .npz holds no patient/slide ids, so its 19 images are split as independent" in err
    assert "WARNING" not in err
    (tmp_path / "dcm" / "ct").mkdir(parents=True)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for i in range(3):  # three scans, one anonymised PatientID
        ds.PatientID = "ANONYMOUS"
        ds.PixelData = (ds.pixel_array + i).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(tmp_path / "dcm" / "ct" / f"scan{i}.dcm")
    summary = ingest(tmp_path / "dcm", tmp_path / "out", DataConfig(), SMALL, progress=False)
    assert summary["groups"] == 1 and summary["ungrouped"] == 0
    assert "ingest: WARNING all 3 images share one patient/slide id 'ANONYMOUS'" in capsys.readouterr().err


def test_grouping_warnings_name_where_the_id_should_have_come_from() -> None:
    from medflow.data.ingest import grouping_warnings

    rows = [{"group": "P1", "grouped": True, "source_split": ""}, {"group": "b.png", "grouped": False, "source_split": ""}]
    csv = DataConfig(csv=CsvSource(group_column="patient"))
    (only,) = grouping_warnings(rows, "csv", csv)
    assert only.startswith("ingest: WARNING 1 of 2 images have no patient/slide id (their data.csv.group_column "
                           "'patient' is empty):")
    (dicom,) = grouping_warnings(rows, "dicom", DataConfig(group_pattern=None))
    assert "(data.group_pattern is not set; they have no PatientID)" in dicom
    assert grouping_warnings(rows[:1], "folder", DataConfig()) == []  # one image: nothing to separate
