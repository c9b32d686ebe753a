"""Turn a source (class-folder tree, CSV of file -> label, MedMNIST .npz, DICOM folder) into records.

A :class:`Record` is one candidate image: where its bytes are, its label, group and official split.
Problems known before decoding (CSV row naming a missing file, a file listed under two labels, an
image outside any class folder) travel as ``problem`` so the image is quarantined, never dropped.
Records come back sorted by a natural sort of ``path`` (``img2`` before ``img10``). Hidden files and
folders (``.DS_Store``, ``.git/``) and ``__MACOSX/`` (what macOS zips add) are skipped everywhere.
"""

from __future__ import annotations

import functools
import io
import os
import re
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from medflow.concurrency import ordered_map
from medflow.data.images import DICOM_SUFFIXES, IMAGE_SUFFIXES
from medflow.data.manifest import EXTRA
from medflow.io import npy_header

if TYPE_CHECKING:
    from medflow.config import CsvSource, DataConfig

Format = Literal["folder", "csv", "npz", "dicom"]
# folder names (any case) read as an official split of a split tree root/<split>/<class>/
SPLIT_DIRS = {"train": "train", "training": "train", "val": "val", "valid": "val",
              "validation": "val", "test": "test", "testing": "test"}
# Fallback group rule: Kaggle diabetic-retinopathy names ``<patient>_left`` / ``<patient>_right``.
EYE_PAIR = re.compile(r"^(?P<group>.+?)_(?:left|right)$", re.IGNORECASE)
_DIGIT_RUNS = re.compile(r"(\d+)")
IGNORED_DIRS = frozenset({"__MACOSX"})  # resource forks macOS adds to zips; hidden names are skipped too


class SourceError(ValueError):
    """The source as a whole cannot be read as configured (format, CSV columns, npz keys, no images)."""


@dataclass(frozen=True)
class Record:
    """One candidate image; exactly one of ``file`` / ``array`` is set unless ``problem`` is."""

    path: str
    label: str
    group: str | None = None
    source_split: str = ""
    file: str | None = None  # path to read
    array: np.ndarray | None = None
    problem: tuple[str, str] | None = None  # (reason, detail) known before decoding


def natural_key(text: str) -> list[str | int]:
    """Sort key that orders digit runs numerically: ``a2`` < ``a10``."""
    parts: list[str | int] = _DIGIT_RUNS.split(text)
    parts[1::2] = map(int, parts[1::2])  # split() puts the captured digit runs at the odd positions
    return parts


@functools.lru_cache(maxsize=16)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def resolve_group(stem: str, pattern: str | None) -> str | None:
    """Group id from a file stem: ``pattern`` (named group 'group', else group 1, else the match),
    then the ``<patient>_(left|right)`` eye-pair rule; None when neither matches."""
    if pattern:
        m = _compiled(pattern).search(stem)
        if m:
            value = m.groupdict().get("group") or (m.group(1) if m.re.groups else m.group(0))
            if value:
                return value
    m = EYE_PAIR.match(stem)
    return m.group("group") if m else None


def ignored(name: str) -> bool:
    """A hidden file or folder (``.DS_Store``, ``.git``) or ``__MACOSX``: never part of a source."""
    return name.startswith(".") or name in IGNORED_DIRS


def iter_files(folder: str) -> Iterator[str]:
    """Every file below ``folder`` except :func:`ignored` ones (and those in ignored folders), as joined
    path strings, folder by folder."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not ignored(d)]
        yield from (os.path.join(dirpath, f) for f in filenames if not ignored(f))


def list_files(folder: str) -> list[str]:
    """:func:`iter_files` as a list."""
    return list(iter_files(folder))


def _entries(folder: str) -> list[os.DirEntry]:
    """The entries of ``folder`` that are not :func:`ignored`, by name."""
    with os.scandir(folder) as it:
        return sorted((e for e in it if not ignored(e.name)), key=lambda e: e.name)


def _is_split_tree(root: str, tops: list[os.DirEntry]) -> bool:
    """Whether the top-level folders are official splits (all named as in :data:`SPLIT_DIRS`) rather than
    classes (none is); a mix is a :class:`SourceError` naming the odd folders, as guessing either way would
    turn ``train``/``test`` into classes or drop a class."""
    names = [e.name for e in tops]
    splits = [n for n in names if n.lower() in SPLIT_DIRS]
    if not splits:
        return False
    odd = [n for n in names if n.lower() not in SPLIT_DIRS]
    if odd:
        raise SourceError(
            f"{root}: top-level folders {splits} are split names but {odd} are not, so this is neither a split "
            f"tree (root/<split>/<class>/..., only split folders on top; split names, any case: "
            f"{', '.join(SPLIT_DIRS)}) nor a class-folder tree (root/<class>/..., no split-named folder). "
            f"Move {odd} out of the source or rename them to split names (e.g. holdout -> test); if {splits} "
            "are classes, rename those. Hidden folders and __MACOSX are ignored")
    return True


def _suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def detect_format(path: str | Path) -> Format:
    """'csv' | 'npz' for those files; a folder is 'dicom' when it holds DICOM but no images, else 'folder'."""
    path = Path(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            return "csv"
        if suffix == ".npz":
            return "npz"
        raise SourceError(f"{path}: cannot tell the source format from a {suffix or 'suffix-less'} file")
    if not path.is_dir():
        raise FileNotFoundError(f"data source {path} does not exist")
    dicom = False
    for f in iter_files(str(path)):  # stops at the first image: a large tree is not listed twice
        suffix = _suffix(f)
        if suffix in IMAGE_SUFFIXES:
            return "folder"
        dicom = dicom or suffix in DICOM_SUFFIXES
    return "dicom" if dicom else "folder"


def folder_records(root: str | Path, group_pattern: str | None) -> list[Record]:
    """Class folders (``root/<class>/...``) or split folders (``root/{train,val,test}/<class>/...``).

    Every non-hidden file inside a class folder is a candidate (content decides whether it is an
    image); image/DICOM files outside any class folder are quarantined as ``no_label``; other
    files there (README, CSV) are metadata and ignored. Top-level folders that are partly split names
    (``train/``, ``test/`` beside ``holdout/``) raise :class:`SourceError`.
    """
    root = str(root)
    prefix = os.path.join(root, "")
    entries = _entries(root)
    tops = [e for e in entries if e.is_dir()]
    is_split_tree = _is_split_tree(root, tops)
    class_dirs: list[tuple[os.DirEntry, str]] = []
    loose = [e.path for e in entries if e.is_file()]
    for top in tops:
        if not is_split_tree:
            class_dirs.append((top, ""))
            continue
        inner = _entries(top.path)
        class_dirs += [(e, SPLIT_DIRS[top.name.lower()]) for e in inner if e.is_dir()]
        loose += [e.path for e in inner if e.is_file()]
    records = [
        Record(f[len(prefix):].replace(os.sep, "/"), class_dir.name,
               resolve_group(_stem(f), group_pattern), split, file=f)
        for class_dir, split in class_dirs for f in list_files(class_dir.path)
    ]
    records += [
        Record(f[len(prefix):].replace(os.sep, "/"), "", problem=("no_label", "image is not inside a class folder"))
        for f in loose if _suffix(f) in IMAGE_SUFFIXES | DICOM_SUFFIXES
    ]
    return sorted(records, key=lambda r: natural_key(r.path))


def csv_files(csv_path: Path, cfg: CsvSource, columns: Sequence[str] = ()) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """A CSV list read as text (``.tsv``: tab-separated; ``NA`` stays a name) after checking it has
    ``cfg.image_column`` and ``columns``, and per row ``(name as written, stripped; file relative to the
    CSV's folder)``: under ``cfg.image_dir``, ``cfg.extension`` appended unless the name ends with it."""
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, sep="\t" if csv_path.suffix == ".tsv" else ",")
    missing = [c for c in (cfg.image_column, *columns) if c not in df.columns]
    if missing:
        raise SourceError(f"{csv_path}: missing column(s) {missing}; columns are {list(df.columns)} "
                         "(set data.csv.image_column / label_column / group_column)")
    base = csv_path.parent
    image_dir = base / cfg.image_dir if cfg.image_dir else base
    files = []
    for name in df[cfg.image_column].str.strip():
        file = name + cfg.extension if cfg.extension and not name.lower().endswith(cfg.extension.lower()) else name
        files.append((name, Path(os.path.relpath(image_dir / file, base)).as_posix()))
    return df, files


def csv_records(csv_path: str | Path, cfg: CsvSource, group_pattern: str | None) -> list[Record]:
    """Rows of ``image,label[,group]``; files relative to ``cfg.image_dir`` (default: the CSV's folder).

    Rows naming a missing file -> ``missing_file``; empty label -> ``no_label``; one file listed
    under two different labels -> ``conflicting_labels``; identical repeated rows collapse to one.
    """
    csv_path = Path(csv_path)
    df, files = csv_files(csv_path, cfg, [cfg.label_column] + ([cfg.group_column] if cfg.group_column else []))
    base = csv_path.parent
    rows: dict[str, list[tuple[int, str, str | None]]] = defaultdict(list)
    for line, ((_, rel), label, group) in enumerate(zip(
        files, df[cfg.label_column].str.strip(),
        df[cfg.group_column].str.strip() if cfg.group_column else [None] * len(df),
    ), start=2):
        rows[rel].append((line, label, group or None))
    records = []
    for rel, entries in rows.items():
        labels = sorted({label for _, label, _ in entries})
        line, label, group = entries[0]
        file = base / rel
        if group is None and not cfg.group_column:
            group = resolve_group(_stem(rel), group_pattern)
        problem = None
        if len(labels) > 1:
            problem = ("conflicting_labels", f"CSV lines {[e[0] for e in entries]} give labels {labels}")
        elif not label:
            problem = ("no_label", f"CSV line {line} has an empty {cfg.label_column!r}")
        elif not file.is_file():
            problem = ("missing_file", f"CSV line {line} names {rel}, which does not exist")
        records.append(Record(rel, label, group, file=None if problem else str(file), problem=problem))
    return sorted(records, key=lambda r: natural_key(r.path))


def _npz_array(z: np.lib.npyio.NpzFile, key: str, npz_path: Path) -> np.ndarray:
    """``z[key]``, or a :class:`SourceError` saying why it cannot be used (missing, object array)."""
    if key not in z.files:
        raise SourceError(f"{npz_path}: key {key!r} is missing (keys present: {z.files}); in the MedMNIST layout "
                          "every {split}_images array needs a {split}_labels array, one label per image")
    try:
        return z[key]
    except ValueError as e:  # numpy refuses object (pickled) arrays without allow_pickle, never enabled here
        if not _npz_holds_objects(z, key):
            raise SourceError(f"{npz_path}: {key} cannot be read: {e}") from None
        if key.endswith("_images"):
            what = ("images of different sizes cannot be stored in one MedMNIST array; resize them to one "
                    "size (MedMNIST uses 28, 64, 128 or 224 px) or keep them as image files in class folders "
                    "(root/<class>/...) instead")
        else:
            what = "labels must be one integer class id per image (data.label_names names the classes)"
        raise SourceError(f"{npz_path}: {key} is an object array: {what}") from None


def _npz_holds_objects(z: np.lib.npyio.NpzFile, key: str) -> bool:
    """Whether member ``key`` of the .npz is an object (pickled) array, from its .npy header alone."""
    try:
        with z.zip.open(f"{key}.npy") as f:
            return bool(npy_header(f)[2].hasobject)
    except Exception:  # noqa: BLE001 - an unreadable header is not an object array
        return False


def _read_npz_member(npz_path: Path, info: zipfile.ZipInfo) -> np.ndarray | None:
    """One stored or deflated ``.npy`` member of an ``.npz`` as an array (read-only, over the inflated bytes),
    inflated by libdeflate (``imagecodecs``: ~1.6x zlib's speed, GIL released) and CRC-checked; None for
    anything else (other compression, object arrays, a damaged member): ``np.load`` then reads it or says why."""
    import imagecodecs

    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return None
    try:
        with open(npz_path, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(30)
            if header[:4] != b"PK\x03\x04":
                return None
            f.seek(info.header_offset + 30 + int.from_bytes(header[26:28], "little")
                   + int.from_bytes(header[28:30], "little"))
            data = f.read(info.compress_size)
        if info.compress_type == zipfile.ZIP_DEFLATED:
            data = imagecodecs.deflate_decode(data, raw=True, out=info.file_size)
        if len(data) != info.file_size or zlib.crc32(data) != info.CRC:
            return None
        npy = io.BytesIO(data[:65536])  # the .npy header (magic, version, dict) comes first
        shape, fortran, dtype = npy_header(npy)
        if dtype.hasobject:
            return None
        arr = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=npy.tell())
        return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    except Exception:  # noqa: BLE001 - np.load reads the member again and reports what is wrong with it
        return None


def _npz_arrays(npz_path: Path, z: np.lib.npyio.NpzFile, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an open ``.npz``, inflated on 2 threads (:func:`_read_npz_member`); a key it
    cannot read that way comes from :func:`_npz_array` (``np.load``, with its errors)."""
    infos = {k: z.zip.getinfo(f"{k}.npy") for k in keys if k in z.files}
    fast = dict(zip(infos, ordered_map(lambda info: _read_npz_member(npz_path, info), infos.values(), 2,
                                       name="npz")))
    return {k: _npz_array(z, k, npz_path) if fast.get(k) is None else fast[k] for k in keys}


def npz_records(npz_path: str | Path, label_names: dict[str, str] | None) -> list[Record]:
    """MedMNIST ``{train,val,test}_{images,labels}``; the official split is kept."""
    npz_path = Path(npz_path)
    records = []
    with np.load(npz_path) as z:
        splits = [s for s in ("test", "train", "val") if f"{s}_images" in z.files]  # natural order of the ids
        if not splits:
            raise SourceError(f"{npz_path}: no {{train,val,test}}_images arrays (keys: {z.files})")
        arrays = _npz_arrays(npz_path, z, [f"{s}_{kind}" for s in splits for kind in ("images", "labels")])
        for split in splits:
            images = arrays[f"{split}_images"]
            labels = np.asarray(arrays[f"{split}_labels"])
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.ndim != 1 or len(labels) != len(images):
                raise SourceError(f"{npz_path}: {split}_labels has shape {labels.shape}; "
                                 f"expected one label per image ({len(images)}); multi-label sets are unsupported")
            values = [str(v) for v in labels.tolist()]
            if label_names and (unnamed := sorted(set(values) - set(label_names), key=natural_key)):
                raise SourceError(f"{npz_path}: {split}_labels holds class ids {unnamed} that data.label_names does not "
                                  f"name (it names {sorted(label_names, key=natural_key)}); add them, or remove "
                                  "data.label_names to use the ids as labels")
            for i, (image, value) in enumerate(zip(images, values)):
                label = (label_names or {}).get(value, value)
                records.append(Record(f"{npz_path.name}:{split}:{i}", label, None, split, array=image))
    return records


def list_records(source: str | Path, fmt: Format, data: DataConfig) -> list[Record]:
    """Records of ``source`` read as ``fmt`` (see :func:`detect_format`)."""
    path = Path(source)
    wrong_kind = path.is_dir() != (fmt in ("folder", "dicom"))
    if path.exists() and (wrong_kind or path.is_file() and zipfile.is_zipfile(path) != (fmt == "npz")):
        found = "a folder" if path.is_dir() else f"a {path.suffix or 'suffix-less'} file"
        raise SourceError(f"data.format is {fmt!r} but {path} is {found}: set data.format to auto (or to the kind "
                          "the source is: folder, csv, npz, dicom)")
    if fmt in ("folder", "dicom"):
        return folder_records(source, data.group_pattern)
    if fmt == "csv":
        return csv_records(source, data.csv, data.group_pattern)
    if fmt == "npz":
        return npz_records(source, data.label_names)
    raise SourceError(f"unknown data format {fmt!r}")


def extra_records(patterns: list[str] | tuple[str, ...], group_pattern: str | None, root: str | Path = ".") -> list[Record]:
    """Records of every class-folder source matching ``patterns`` (globs relative to ``root``),
    ids prefixed with the folder's relative path, ``source_split`` :data:`~medflow.data.manifest.EXTRA`
    (the split stage puts them in train, never moving the source's own rows)."""
    root = Path(root)
    folders = sorted({p for pat in patterns for p in root.glob(pat) if p.is_dir() and not ignored(p.name)},
                     key=lambda p: natural_key(str(p)))
    out = []
    for folder in folders:
        prefix = folder.relative_to(root).as_posix()
        for r in folder_records(folder, group_pattern):
            out.append(Record(f"{prefix}/{r.path}", r.label, r.group, EXTRA, r.file, r.array, r.problem))
    return out
