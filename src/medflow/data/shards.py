"""Processed data: fixed-length-record shards per split that training streams with ``tf.data``.

``out_dir/{split}/shard-NNNNN.rec`` holds ``shard_size`` records of ``RECORD_HEADER`` bytes
(label class index and position in the split, little-endian int32) followed by the image's raw
uint8 H×W×C pixels; ``out_dir/{split}/ids.json`` lists the split's manifest ids by position,
``groups.json`` their patient/slide groups (what evaluation's bootstrap resamples), and
``out_dir/meta.json`` the classes, sizes and counts. Writing reads pixel rows straight into the
records (no per-image serialisation), reading is ``tf.data.FixedLengthRecordDataset`` plus one ``decode_raw``
per batch. ``write_shards`` reads ``pixels.npy`` block by block into a reusable buffer, so memory stays
bounded whatever the data size. Class order: ``data.labels`` when given, else sorted label names.
TensorFlow is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from medflow.config import DataConfig
from medflow.data.manifest import EXCLUDED, SPLITS
from medflow.data.split import read_manifest
from medflow.io import npy_header, preallocate, read_csv, replace_dir
from medflow.layout import OutOfDate, require
from medflow.progress import progress_bar

if TYPE_CHECKING:
    import tensorflow as tf

META = "meta.json"
IDS = "ids.json"
GROUPS = "groups.json"
FORMAT = "medflow-fixed-records-v1"
RECORD_HEADER = 8  # int32 label + int32 position, little-endian
SHUFFLE_BYTES = 256 * 2**20  # raw image bytes the shuffle buffer may hold (memory bound)
MIN_SHUFFLE = 64  # examples in the shuffle buffer even for very large images
# Batches read ahead. Fixed: an autotuned prefetch grows toward tf.data's RAM budget (half the machine's
# memory), so its peak would depend on the machine and the consumer's speed; 2 keeps the reader ahead.
PREFETCH_BATCHES = 2
BLOCK_BYTES = 2**20  # bytes of records a shard writer fills per write (its reusable buffer; fresh pages are costly)
IOV_MAX = 1024


def record_dtype(size: int, channels: int) -> np.dtype:
    """One record: ``label`` and ``position`` (<i4) then ``image`` (uint8 size×size×channels), unpadded."""
    return np.dtype([("label", "<i4"), ("position", "<i4"), ("image", "u1", (size, size, channels))])


def write_shards(manifest_csv: str | Path, pixels_npy: str | Path, splits_csv: str | Path,
                 out_dir: str | Path, *, shard_size: int, data: DataConfig, workers: int = 2,
                 progress: bool = True) -> dict:
    """Pack pixels per split into ``out_dir/{split}/shard-NNNNN.rec`` + ``ids.json``, and ``out_dir/meta.json``.

    Each shard file is created at its full size, then filled block by block (at most ``BLOCK_BYTES``
    each) on ``workers`` threads, each through one reusable buffer: pixel rows are read into the records'
    image slots with ``preadv`` (one call per run of consecutive rows, no memory map, no extra copy) and
    the block is written at its offset, so memory stays bounded whatever the shard size.
    The whole folder is built under a temporary name next to ``out_dir`` and swapped in at the end.
    """
    manifest = read_manifest(manifest_csv, ["id", "label", "row", "group"])
    splits = read_csv(splits_csv, ["id", "split"], text=("id", "split"))
    split_ids = pd.Index(splits["id"])
    if not split_ids.is_unique:
        raise ValueError(f"{splits_csv}: ids repeat, e.g. {split_ids[split_ids.duplicated()][:5].tolist()}")
    where = split_ids.get_indexer(manifest["id"])
    split = np.where(where >= 0, splits["split"].to_numpy(dtype=object, na_value=None)[where], None)
    if (missing := np.flatnonzero(pd.isna(split))).size:
        raise ValueError(f"{splits_csv}: {missing.size} manifest ids have no split, "
                         f"e.g. {manifest['id'].iloc[missing[:5]].tolist()}")
    if unknown := set(split) - {*SPLITS, EXCLUDED}:
        raise ValueError(f"{splits_csv}: unknown split values {sorted(unknown)}; expected {SPLITS} or {EXCLUDED!r}")
    excluded = int((split == EXCLUDED).sum())  # extra rows linked to val/test rows: written to no split
    labels = manifest["label"].astype(str).to_numpy()
    classes = list(data.labels) if data.labels else sorted(set(labels))
    index = pd.Index(classes).get_indexer(labels).astype(np.int32)
    if (index < 0).any():
        raise ValueError(f"labels {sorted(set(labels[index < 0]))} are not in data.labels {classes}")
    with open(pixels_npy, "rb") as f:
        shape, fortran, dtype = npy_header(f)
        offset = f.tell()
    if len(shape) != 4 or shape[1] != shape[2] or dtype != np.uint8 or fortran:
        raise ValueError(f"{pixels_npy}: expected uint8 N×S×S×C, got {dtype} of shape {shape}")
    rows = manifest["row"].to_numpy(dtype=np.int64)
    if len(rows) and int(rows.max()) >= shape[0]:
        raise ValueError(f"manifest row {int(rows.max())} is outside {pixels_npy} ({shape[0]} rows)")

    size, channels = int(shape[1]), int(shape[3])
    record = record_dtype(size, channels)
    row_bytes = size * size * channels
    block = max(1, min(shard_size, BLOCK_BYTES // record.itemsize))
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    meta: dict = {"format": FORMAT, "record_bytes": record.itemsize, "classes": classes, "ordered": data.ordered,
                  "image_size": size, "channels": channels, "counts": {}, "class_counts": {}, "shards": {}}
    buffers = threading.local()  # one block buffer per thread, reused across blocks and shards
    fd = os.open(pixels_npy, os.O_RDONLY)

    def write(path: Path, at: int, labels: np.ndarray, start: int, rows: np.ndarray) -> int:
        """Records ``at`` .. ``at + len(rows)`` of the shard ``path`` (created at its full size beforehand)."""
        if not hasattr(buffers, "records"):
            buffers.records = np.empty(block, record)
        records = buffers.records[:len(rows)]
        records["label"] = labels
        records["position"] = np.arange(start, start + len(rows), dtype=np.int32)
        images = records["image"]
        cuts = np.flatnonzero(np.diff(rows) != 1) + 1  # runs of consecutive rows: one read each
        for i, j in zip([0, *cuts], [*cuts, len(rows)]):
            for k in range(i, j, IOV_MAX):  # the kernel's limit on buffers per call
                slots = [memoryview(images[m]) for m in range(k, min(j, k + IOV_MAX))]
                want = len(slots) * row_bytes
                if os.preadv(fd, slots, offset + int(rows[k]) * row_bytes) != want:
                    raise ValueError(f"{pixels_npy}: short read at row {int(rows[k])}")
        out = os.open(path, os.O_WRONLY)
        try:
            if os.pwrite(out, records.data, at * record.itemsize) != records.nbytes:
                raise OSError(f"{path}: short write (disk full?)")
        finally:
            os.close(out)
        return len(rows)

    ids = manifest["id"].to_numpy(dtype=str)
    groups = manifest["group"].to_numpy(dtype=str) if "group" in manifest else ids
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="shards") as pool, \
                progress_bar(total=len(rows), desc="shards", unit="img", enabled=progress) as bar:
            jobs = []
            for name in SPLITS:
                sel = np.flatnonzero(split == name)
                sel = sel[np.argsort(rows[sel], kind="stable")]  # ascending rows: sequential reads
                (tmp / name).mkdir()
                starts = range(0, len(sel), shard_size)
                for k, a in enumerate(starts):
                    path, part = tmp / name / f"shard-{k:05d}.rec", sel[a:a + shard_size]
                    with open(path, "wb") as f:
                        preallocate(f.fileno(), len(part) * record.itemsize, path)
                    # one job per buffer-sized block, so the threads share even a single shard
                    jobs += [pool.submit(write, path, b, index[part[b:b + block]], a + b, rows[part[b:b + block]])
                             for b in range(0, len(part), block)]
                for file, values in ((IDS, ids), (GROUPS, groups)):  # written while the threads copy pixels
                    (tmp / name / file).write_text(json.dumps(values[sel].tolist()) + "\n")
                meta["counts"][name] = len(sel)
                per_class = np.bincount(index[sel], minlength=len(classes)).tolist()
                meta["class_counts"][name] = dict(zip(classes, per_class))
                meta["shards"][name] = [f"shard-{k:05d}.rec" for k in range(len(starts))]
            for job in jobs:
                bar.update(job.result())
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)
    replace_dir(tmp, out_dir)
    print(f"shards: {len(rows)} images ({size}px, {channels}ch, {len(classes)} classes) -> "
          + ", ".join(f"{s} {meta['counts'][s]} in {len(meta['shards'][s])} shard(s)" for s in SPLITS)
          + (f", {excluded} excluded (split '{EXCLUDED}')" if excluded else "") + f" at {out_dir}", file=sys.stderr)
    return {k: meta[k] for k in ("classes", "image_size", "channels", "counts")} | {
        "shards": {s: len(v) for s, v in meta["shards"].items()}} | ({"excluded": excluded} if excluded else {})


def read_meta(processed_dir: str | Path) -> dict:
    """The ``meta.json`` written by ``write_shards`` (refuses folders in another shard format)."""
    path = require(Path(processed_dir) / META, "medflow preprocess")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise OutOfDate(f"{path}: shard format {meta.get('format')!r}, expected {FORMAT!r}; "
                         "rerun the preprocess stage (`dvc repro preprocess` or `medflow preprocess`)")
    return meta


def all_shard_files(processed_dir: str | Path) -> list[Path]:
    """Every file holding a split's data (shards, id and group lists), sorted: what a data fingerprint covers."""
    root = Path(processed_dir)
    return sorted([*root.glob("*/shard-*.rec"), *root.glob(f"*/{IDS}"), *root.glob(f"*/{GROUPS}")])


def _files(processed_dir: str | Path, split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return sorted(str(p) for p in (Path(processed_dir) / split).glob("shard-*.rec"))


def read_ids(processed_dir: str | Path, split: str) -> list[str]:
    """The manifest ids of one split, by position."""
    path = Path(processed_dir) / split / IDS
    return json.loads(path.read_text()) if path.exists() else []


def read_groups(processed_dir: str | Path, split: str) -> list[str] | None:
    """The patient/slide group of each image of one split, by position (None for shards written without)."""
    path = Path(processed_dir) / split / GROUPS
    return json.loads(path.read_text()) if path.exists() else None


def _parser(meta: dict, ids: list[str] | None, dtype: str = "float32"):
    """A function parsing a *batch* of records into ``dtype`` images, int32 labels (``+ id`` when ``ids``
    given), of static shape."""
    import tensorflow as tf

    s, c = meta["image_size"], meta["channels"]
    id_table = None if ids is None else tf.constant(ids or [""], dtype=tf.string)

    def parse(records: tf.Tensor):
        head = tf.io.decode_raw(tf.strings.substr(records, 0, RECORD_HEADER), tf.int32, little_endian=True)
        images = tf.reshape(tf.io.decode_raw(records, tf.uint8)[:, RECORD_HEADER:], [-1, s, s, c])
        images = images if dtype == "uint8" else tf.cast(images, dtype)
        labels = head[:, 0]
        return (images, labels) if id_table is None else (images, labels, tf.gather(id_table, head[:, 1]))

    return parse


def dataset(processed_dir: str | Path, split: str, *, batch_size: int, shuffle: bool = False,
            seed: int = 0, with_ids: bool = False, dtype: str = "float32") -> "tf.data.Dataset":
    """Stream ``(image 0..255 (S,S,C) as dtype, label int32)`` batches (``+ id`` with ``with_ids``).

    Reads the shard files lazily; with ``shuffle`` the shard order and a bounded buffer of
    examples are shuffled (seeded, reshuffled each epoch). Memory does not grow with the data.
    """
    import tensorflow as tf

    meta = read_meta(processed_dir)
    files = _files(processed_dir, split)
    record_bytes = int(meta["record_bytes"])
    read = lambda f: tf.data.FixedLengthRecordDataset(f, record_bytes)  # noqa: E731
    names = tf.data.Dataset.from_tensor_slices(tf.constant(files, dtype=tf.string))
    if shuffle:
        names = names.shuffle(max(len(files), 1), seed=seed, reshuffle_each_iteration=True)
        ds = names.interleave(read, cycle_length=min(4, max(len(files), 1)),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        per_image = meta["image_size"] ** 2 * meta["channels"]
        buffer = min(int(meta["counts"][split]), max(MIN_SHUFFLE, SHUFFLE_BYTES // per_image))
        ds = ds.shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=True)
    else:
        ds = read(names)  # shard by shard, in manifest row order
    parse = _parser(meta, read_ids(processed_dir, split) if with_ids else None, dtype)
    ds = ds.batch(batch_size).map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(PREFETCH_BATCHES)


def load_arrays(processed_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All of one split in memory (for evaluation/reports): uint8 N×S×S×C, int labels, ids."""
    meta = read_meta(processed_dir)
    dtype = record_dtype(meta["image_size"], meta["channels"])
    files = _files(processed_dir, split)
    records = np.concatenate([np.fromfile(f, dtype) for f in files]) if files else np.zeros(0, dtype)
    ids = read_ids(processed_dir, split)
    return (np.ascontiguousarray(records["image"]), records["label"].astype(np.int64),
            [ids[i] for i in records["position"]])
