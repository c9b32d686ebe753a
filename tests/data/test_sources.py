"""Sources -> records: class/split folders, CSV (diabetic-retinopathy form), MedMNIST npz, group rules."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medflow.config import CsvSource, DataConfig
from medflow.data.sources import (
    SourceError,
    csv_records,
    detect_format,
    folder_records,
    list_records,
    natural_key,
    npz_records,
    resolve_group,
)

MALARIA_PATTERN = DataConfig().group_pattern


def write_medmnist(path: Path, *, grey: bool = False) -> None:
    """A tiny .npz in the official MedMNIST layout: {split}_images (N,H,W[,3]) uint8, {split}_labels (N,1)."""
    rng = np.random.default_rng(0)
    shape = (28, 28) if grey else (28, 28, 3)
    arrays = {}
    for split, n in (("train", 12), ("val", 3), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, *shape), np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1).astype(np.uint8)
    np.savez_compressed(path, **arrays)


@pytest.mark.parametrize("stem,group", [
    ("C39P4thinF_original_IMG_20150622_105335_cell_16", "C39P4"),
    ("C47P8thinOriginalOlympusCX21_IMG_20150717_174222_cell_17", "C47P8"),
    ("C47P8thin_Original_Motic_IMG_20150714_093715_cell_76", "C47P8"),
    ("C3thin_original_IMG_20150608_163047_cell_22", "C3"),
    ("C68P29N_ThinF_IMG_20150819_134625_cell_111", "C68P29N"),
    ("C101P62ThinF_IMG_20150918_151149_cell_87", "C101P62"),
    ("C59P20thinF_IMG_20150803_113430_cell_19", "C59P20"),
    ("C51AP12thinF_IMG_20150724_153313_cell_106", "C51AP12"),
    ("C12NThinF_IMG_20150614_124212_cell_213", "C12N"),
    ("C201ThinF_IMG_20150930_142848_cell_32", "C201"),
    ("C167P128ReThinF_IMG_20151201_110011_cell_239", "C167P128Re"),
])
def test_nih_name_forms_resolve(stem: str, group: str) -> None:
    assert resolve_group(stem, MALARIA_PATTERN) == group


def test_group_fallbacks() -> None:
    assert resolve_group("10_left", MALARIA_PATTERN) == "10"  # DR eye pair, default rule
    assert resolve_group("10_Right", None) == "10"
    assert resolve_group("scan_77", r"scan_(\d+)") == "77"  # unnamed group 1
    assert resolve_group("unrelated", MALARIA_PATTERN) is None


def test_every_malaria_file_gets_its_slide(malaria_dir: Path) -> None:
    records = folder_records(malaria_dir, MALARIA_PATTERN)
    assert len(records) == 400
    assert Counter(r.label for r in records) == {"Parasitized": 200, "Uninfected": 200}
    assert all(r.group and Path(r.path).stem.startswith(r.group) and r.group[0] == "C" for r in records)
    assert len({r.group for r in records}) == 148
    assert [r.path for r in records] == sorted((r.path for r in records), key=natural_key)
    assert records[0].path.startswith("Parasitized/") and records[0].source_split == ""


def test_split_tree_and_loose_files(tmp_path: Path, malaria_dir: Path) -> None:
    cells = sorted((malaria_dir / "Uninfected").iterdir())[:6]
    for i, split in enumerate(("train", "val", "test")):
        for cls in ("nevus", "melanoma"):
            (tmp_path / split / cls).mkdir(parents=True)
            shutil.copy(cells[2 * i + (cls == "nevus")], tmp_path / split / cls / f"{cls}_{i}.png")
    shutil.copy(cells[0], tmp_path / "train" / "unlabelled.png")
    (tmp_path / "README.txt").write_text("metadata, ignored")
    (tmp_path / "train" / "nevus" / ".DS_Store").write_bytes(b"\0")
    records = folder_records(tmp_path, MALARIA_PATTERN)
    by_path = {r.path: r for r in records}
    assert len(records) == 7 and "README.txt" not in by_path
    assert by_path["val/melanoma/melanoma_1.png"].source_split == "val"
    assert by_path["train/nevus/nevus_0.png"].label == "nevus"
    assert by_path["train/unlabelled.png"].problem == ("no_label", "image is not inside a class folder")
    assert Counter(r.source_split for r in records if not r.problem) == {"train": 2, "val": 2, "test": 2}


def make_dr_csv(root: Path, malaria_dir: Path) -> Path:
    """Kaggle diabetic-retinopathy form: image,level with names like 10_left (files 10_left.jpeg)."""
    (root / "train").mkdir()
    cell = next((malaria_dir / "Parasitized").iterdir())
    for name in ("10_left", "10_right", "13_left", "13_right", "15_left"):
        shutil.copy(cell, root / "train" / f"{name}.jpeg")  # content does not matter for records
    csv = root / "trainLabels.csv"
    csv.write_text("image,level\n10_left,0\n10_right,0\n13_left,2\n13_right,4\n13_right,4\n"
                   "15_left,1\n15_left,3\n21_left,2\n22_right,\n")
    return csv


def test_csv_records_dr_form(tmp_path: Path, malaria_dir: Path) -> None:
    csv = make_dr_csv(tmp_path, malaria_dir)
    cfg = CsvSource(image_dir="train", extension=".jpeg")
    records = {r.path: r for r in csv_records(csv, cfg, MALARIA_PATTERN)}
    assert list(records) == ["train/10_left.jpeg", "train/10_right.jpeg", "train/13_left.jpeg",
                             "train/13_right.jpeg", "train/15_left.jpeg", "train/21_left.jpeg", "train/22_right.jpeg"]
    assert records["train/10_right.jpeg"].label == "0" and records["train/13_right.jpeg"].label == "4"
    assert {r.group for r in records.values() if r.path.startswith("train/1")} == {"10", "13", "15"}
    assert records["train/13_right.jpeg"].problem is None  # identical repeated row collapsed
    assert records["train/15_left.jpeg"].problem[0] == "conflicting_labels"
    assert records["train/21_left.jpeg"].problem[0] == "missing_file"
    assert records["train/22_right.jpeg"].problem[0] == "no_label"
    assert records["train/10_left.jpeg"].file == str(tmp_path / "train" / "10_left.jpeg")


def test_csv_group_column_and_bad_columns(tmp_path: Path, malaria_dir: Path) -> None:
    cell = next((malaria_dir / "Parasitized").iterdir())
    shutil.copy(cell, tmp_path / "a.png")
    shutil.copy(cell, tmp_path / "b.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("file,diagnosis,patient\na.png,benign,P1\nb.png,malignant,\n")
    records = csv_records(csv, CsvSource(image_column="file", label_column="diagnosis", group_column="patient"), None)
    assert [(r.path, r.label, r.group) for r in records] == [("a.png", "benign", "P1"), ("b.png", "malignant", None)]
    with pytest.raises(ValueError, match="missing column"):
        csv_records(csv, CsvSource(), None)


def test_npz_records_keep_official_split(tmp_path: Path) -> None:
    path = tmp_path / "tinymnist.npz"
    write_medmnist(path)
    records = npz_records(path, {"0": "basophil", "1": "eosinophil", "2": "erythroblast"})
    assert len(records) == 19
    assert Counter(r.source_split for r in records) == {"train": 12, "val": 3, "test": 4}
    first = records[0]
    assert first.path == "tinymnist.npz:test:0" and first.label == "basophil" and first.array.shape == (28, 28, 3)
    assert records[2].label == "erythroblast"
    assert npz_records(path, None)[2].label == "2"  # no names: the integer as a string
    assert [r.path for r in records][:11] == [f"tinymnist.npz:test:{i}" for i in range(4)] + \
        [f"tinymnist.npz:train:{i}" for i in range(7)]  # natural order: 2 before 10


def test_detect_format(tmp_path: Path, malaria_dir: Path) -> None:
    assert detect_format(malaria_dir) == "folder"
    write_medmnist(tmp_path / "x.npz")
    assert detect_format(tmp_path / "x.npz") == "npz"
    (tmp_path / "labels.csv").write_text("image,level\n")
    assert detect_format(tmp_path / "labels.csv") == "csv"
    ct = get_testdata_file("CT_small.dcm")
    (tmp_path / "dcm" / "ct").mkdir(parents=True)
    shutil.copy(ct, tmp_path / "dcm" / "ct" / "a.dcm")
    assert detect_format(tmp_path / "dcm") == "dicom"
    assert [r.label for r in list_records(tmp_path / "dcm", "dicom", DataConfig())] == ["ct"]
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ValueError, match="cannot tell"):
        detect_format(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "nothing-here")


def test_a_format_that_does_not_match_the_source_is_a_clear_error(tmp_path):
    from medflow.config import DataConfig
    from medflow.data.sources import SourceError, list_records

    folder = tmp_path / "tree"
    (folder / "a").mkdir(parents=True)
    listing = tmp_path / "labels.csv"
    listing.write_text("image,level\nx.png,0\n")
    with pytest.raises(SourceError, match=r"data.format is 'csv' but .*tree is a folder: set data.format to auto"):
        list_records(folder, "csv", DataConfig())
    for fmt in ("folder", "npz"):
        with pytest.raises(SourceError, match=rf"data.format is '{fmt}' but .*labels.csv is a .csv file"):
            list_records(listing, fmt, DataConfig())



def split_tree(root: Path, malaria_dir: Path, splits: tuple[str, ...] = ("train", "test")) -> Path:
    """root/<split>/{Parasitized,Uninfected}/ with two real cells each."""
    for i, split in enumerate(splits):
        for cls in ("Parasitized", "Uninfected"):
            (root / split / cls).mkdir(parents=True)
            for cell in sorted((malaria_dir / cls).iterdir())[2 * i:2 * i + 2]:
                shutil.copy(cell, root / split / cls / cell.name)
    return root


def test_macosx_and_hidden_folders_are_ignored_everywhere(tmp_path: Path, malaria_dir: Path) -> None:
    """A tree unzipped on macOS (``__MACOSX/`` beside the splits, ``._`` resource forks) or carrying a
    ``.git``/``.ipynb_checkpoints`` folder is still a split tree; no folder of those becomes a class."""
    root = split_tree(tmp_path / "tree", malaria_dir)
    fork = root / "__MACOSX" / "train" / "Parasitized"
    fork.mkdir(parents=True)
    (fork / "._cell.png").write_bytes(b"\0\x05\x16\x07")
    (fork / "cell.png").write_bytes(b"not really")  # even a non-hidden file under __MACOSX is skipped
    (root / ".git" / "objects").mkdir(parents=True)
    (root / "train" / "Uninfected" / ".ipynb_checkpoints").mkdir()
    shutil.copy(next((malaria_dir / "Uninfected").iterdir()), root / "train" / "Uninfected" / ".ipynb_checkpoints")
    (root / "train" / "__MACOSX").mkdir()
    records = folder_records(root, MALARIA_PATTERN)
    assert len(records) == 8 and not [r for r in records if r.problem]
    assert Counter((r.source_split, r.label) for r in records) == {
        (s, c): 2 for s in ("train", "test") for c in ("Parasitized", "Uninfected")}
    assert detect_format(root) == "folder"
    flat = tmp_path / "flat"  # a class-folder tree: __MACOSX is no class either
    shutil.copytree(root / "train", flat)
    shutil.copytree(root / "__MACOSX", flat / "__MACOSX", dirs_exist_ok=True)
    assert {r.label for r in folder_records(flat, MALARIA_PATTERN)} == {"Parasitized", "Uninfected"}


@pytest.mark.parametrize("odd", ["holdout", "extra_images"])
def test_split_folders_beside_other_folders_are_a_clear_error(tmp_path: Path, malaria_dir: Path, odd: str) -> None:
    """train/ and test/ beside holdout/ must not silently become classes named train and test."""
    root = split_tree(tmp_path / "tree", malaria_dir)
    (root / odd / "Parasitized").mkdir(parents=True)
    with pytest.raises(SourceError) as err:
        list_records(root, "folder", DataConfig())
    message = str(err.value)
    assert f"['test', 'train'] are split names but ['{odd}'] are not" in message
    assert "train, training, val, valid, validation, test, testing" in message  # every accepted name
    assert "Move" in message and "rename" in message


def test_split_folder_names_are_case_insensitive_aliases(tmp_path: Path, malaria_dir: Path) -> None:
    root = split_tree(tmp_path / "tree", malaria_dir, ("Training", "Validation", "TEST"))
    assert Counter(r.source_split for r in folder_records(root, None)) == {"train": 4, "val": 4, "test": 4}


def test_npz_with_images_but_no_labels_names_the_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "half.npz"
    np.savez(path, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 1), np.uint8),
             test_images=np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(SourceError, match=r"key 'test_labels' is missing \(keys present: \['train_images', "
                                          r"'train_labels', 'test_images'\]\)"):
        npz_records(path, None)


def test_npz_object_arrays_are_a_clear_error(tmp_path: Path) -> None:
    """Images of different sizes only fit an object (pickled) array, which is never loaded."""
    images = np.empty(2, dtype=object)
    images[0], images[1] = np.zeros((28, 28), np.uint8), np.zeros((32, 30), np.uint8)
    np.savez(tmp_path / "ragged.npz", train_images=images, train_labels=np.array([0, 1]))
    with pytest.raises(SourceError, match="train_images is an object array.*images of different sizes cannot be "
                                          "stored in one MedMNIST array"):
        npz_records(tmp_path / "ragged.npz", None)
    labels = np.array(["a", 1], dtype=object)
    np.savez(tmp_path / "odd_labels.npz", train_images=np.zeros((2, 28, 28), np.uint8), train_labels=labels)
    with pytest.raises(SourceError, match="train_labels is an object array: labels must be one integer class id per image"):
        npz_records(tmp_path / "odd_labels.npz", None)


def test_csv_extension_without_its_dot(tmp_path: Path, malaria_dir: Path) -> None:
    """``data.csv.extension: jpeg`` means ``.jpeg`` (not ``10_leftjpeg``); a path or pattern is refused."""
    from medflow.config import ConfigError, parse_params

    csv = make_dr_csv(tmp_path, malaria_dir)
    assert CsvSource(extension="jpeg").extension == CsvSource(extension=" .jpeg").extension == ".jpeg"
    records = {r.path: r for r in csv_records(csv, CsvSource(image_dir="train", extension="jpeg"), None)}
    assert records["train/10_left.jpeg"].problem is None
    for bad in ("*.jpeg", "train/x.jpeg", "."):
        with pytest.raises(ConfigError, match=r"data.csv.extension: .*must be a file suffix such as '.jpeg'"):
            parse_params({"data": {"csv": {"extension": bad}}})


def test_npz_members_read_by_libdeflate_equal_np_load(tmp_path: Path) -> None:
    """The fast member reader returns np.load's arrays (deflated or stored, C or Fortran order, any dtype) and
    hands back to np.load what it cannot read: object arrays and a member whose CRC does not match."""
    import zipfile

    from medflow.data.sources import _npz_arrays, _read_npz_member

    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (9, 28, 28, 3), dtype=np.uint8),
              "train_labels": rng.integers(0, 8, (9, 1)), "val_images": np.asfortranarray(rng.random((3, 5, 4))),
              "val_labels": np.arange(3, dtype=np.int16)}
    for save in (np.savez_compressed, np.savez):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **arrays)
        with np.load(path) as z:
            fast = {k: _read_npz_member(path, z.zip.getinfo(f"{k}.npy")) for k in arrays}
            assert all(v is not None for v in fast.values())
            for k, v in arrays.items():
                assert fast[k].dtype == v.dtype and fast[k].shape == v.shape
                np.testing.assert_array_equal(fast[k], v)
                np.testing.assert_array_equal(_npz_arrays(path, z, [k])[k], z[k])
    ragged = tmp_path / "ragged.npz"
    np.savez(ragged, train_images=np.array([np.zeros((2, 2)), np.zeros((3, 3))], dtype=object))
    with np.load(ragged, allow_pickle=False) as z:
        assert _read_npz_member(ragged, z.zip.getinfo("train_images.npy")) is None
    damaged = tmp_path / "damaged.npz"
    np.savez(damaged, train_images=arrays["train_images"])  # stored: flip one pixel byte in place
    with zipfile.ZipFile(damaged) as zf:
        info = zf.getinfo("train_images.npy")
    raw = bytearray(damaged.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + len(info.extra) + 200] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    with np.load(damaged) as z:
        assert _read_npz_member(damaged, info) is None  # CRC mismatch: np.load decides
        with pytest.raises(zipfile.BadZipFile):
            _npz_arrays(damaged, z, ["train_images"])
