"""Processed data: TFRecord shards per split that training streams with ``tf.data``.

``write_shards`` reads ``pixels.npy`` as a memory map, one shard (``shard_size`` rows) at a time,
so memory stays bounded by the shard, not the dataset. Each ``tf.train.Example`` holds
``image`` (raw uint8 bytes, H×W×C), ``height``, ``width``, ``channels``, ``label`` (class index,
int64) and ``id`` (manifest id). Class order: ``data.labels`` when given, else sorted label names.
TensorFlow is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm import tqdm

from medflow.config import DataConfig
from medflow.data.manifest import SPLITS
from medflow.data.split import read_manifest
from medflow.io import replace_dir

if TYPE_CHECKING:
    import tensorflow as tf

META = "meta.json"
SHUFFLE_BYTES = 256 * 2**20  # raw image bytes the shuffle buffer may hold (memory bound)
MIN_SHUFFLE = 64  # examples in the shuffle buffer even for very large images


def _example(image: np.ndarray, label: int, id_: str) -> bytes:
    import tensorflow as tf

    def ints(v: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))

    def raw(b: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[b]))

    h, w, c = image.shape
    feats = {"image": raw(np.ascontiguousarray(image, dtype=np.uint8).tobytes()), "height": ints(h),
             "width": ints(w), "channels": ints(c), "label": ints(label), "id": raw(id_.encode())}
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def write_shards(manifest_csv: str | Path, pixels_npy: str | Path, splits_csv: str | Path,
                 out_dir: str | Path, *, shard_size: int, data: DataConfig, progress: bool = True) -> dict:
    """Pack pixels per split into ``out_dir/{split}/shard-NNNNN.tfrecord`` plus ``out_dir/meta.json``.

    The whole folder is built under a temporary name next to ``out_dir`` and swapped in at the end.
    """
    import tensorflow as tf

    manifest = read_manifest(manifest_csv)
    splits = pd.read_csv(splits_csv, dtype={"id": "string", "split": "string"})
    df = manifest[["id", "label", "row"]].merge(splits[["id", "split"]], on="id", how="left")
    if df["split"].isna().any():
        missing = df.loc[df["split"].isna(), "id"].head(5).tolist()
        raise ValueError(f"{splits_csv}: {int(df['split'].isna().sum())} manifest ids have no split, e.g. {missing}")
    classes = list(data.labels) if data.labels else sorted(df["label"].astype(str).unique())
    unknown = sorted(set(df["label"].astype(str)) - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown} are not in data.labels {classes}")
    index = {c: i for i, c in enumerate(classes)}
    pixels = np.load(pixels_npy, mmap_mode="r")
    if pixels.ndim != 4 or pixels.shape[1] != pixels.shape[2]:
        raise ValueError(f"{pixels_npy}: expected uint8 N×S×S×C, got shape {pixels.shape}")
    if len(df) and int(df["row"].max()) >= len(pixels):
        raise ValueError(f"manifest row {int(df['row'].max())} is outside {pixels_npy} ({len(pixels)} rows)")

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    meta: dict = {"classes": classes, "ordered": data.ordered, "image_size": int(pixels.shape[1]),
                  "channels": int(pixels.shape[3]), "counts": {}, "class_counts": {}, "shards": {}}
    try:
        bar = tqdm(total=len(df), desc="shards", unit="img", disable=not progress, file=sys.stderr)
        for split in SPLITS:
            part = df[df["split"] == split].sort_values("row")  # sequential memmap reads
            (tmp / split).mkdir()
            names = []
            for k, start in enumerate(range(0, len(part), shard_size)):
                chunk = part.iloc[start:start + shard_size]
                images = np.asarray(pixels[chunk["row"].to_numpy()])
                name = f"shard-{k:05d}.tfrecord"
                with tf.io.TFRecordWriter(str(tmp / split / name)) as w:
                    for img, label, id_ in zip(images, chunk["label"].astype(str), chunk["id"]):
                        w.write(_example(img, index[label], str(id_)))
                names.append(name)
                bar.update(len(chunk))
            meta["counts"][split] = len(part)
            meta["class_counts"][split] = {c: int((part["label"] == c).sum()) for c in classes}
            meta["shards"][split] = names
        bar.close()
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out_dir)
    print(f"shards: {len(df)} images ({meta['image_size']}px, {meta['channels']}ch, {len(classes)} classes) -> "
          + ", ".join(f"{s} {meta['counts'][s]} in {len(meta['shards'][s])} shard(s)" for s in SPLITS)
          + f" at {out_dir}", file=sys.stderr)
    return {k: meta[k] for k in ("classes", "image_size", "channels", "counts")} | {
        "shards": {s: len(v) for s, v in meta["shards"].items()}}


def read_meta(processed_dir: str | Path) -> dict:
    """The ``meta.json`` written by ``write_shards``."""
    return json.loads((Path(processed_dir) / META).read_text())


def _files(processed_dir: str | Path, split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return sorted(str(p) for p in (Path(processed_dir) / split).glob("shard-*.tfrecord"))


def _parser(meta: dict, *, with_ids: bool, as_float: bool):
    """A function parsing a *batch* of serialized examples into tensors of static shape."""
    import tensorflow as tf

    s, c = meta["image_size"], meta["channels"]
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64),
            "id": tf.io.FixedLenFeature([], tf.string)}

    def parse(serialized: tf.Tensor):
        ex = tf.io.parse_example(serialized, spec)
        images = tf.reshape(tf.io.decode_raw(ex["image"], tf.uint8), [-1, s, s, c])
        if as_float:
            images = tf.cast(images, tf.float32)
        labels = tf.cast(ex["label"], tf.int32)
        return (images, labels, ex["id"]) if with_ids else (images, labels)

    return parse


def dataset(processed_dir: str | Path, split: str, *, batch_size: int, shuffle: bool = False,
            seed: int = 0, with_ids: bool = False) -> "tf.data.Dataset":
    """Stream ``(image float32 0..255 (S,S,C), label int32)`` batches (``+ id`` with ``with_ids``).

    Reads the shard files lazily; with ``shuffle`` the shard order and a bounded buffer of
    examples are shuffled (seeded, reshuffled each epoch). Memory does not grow with the data.
    """
    import tensorflow as tf

    meta = read_meta(processed_dir)
    files = _files(processed_dir, split)
    names = tf.data.Dataset.from_tensor_slices(tf.constant(files, dtype=tf.string))
    if shuffle:
        names = names.shuffle(max(len(files), 1), seed=seed, reshuffle_each_iteration=True)
        ds = names.interleave(tf.data.TFRecordDataset, cycle_length=min(4, max(len(files), 1)),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        per_image = meta["image_size"] ** 2 * meta["channels"]
        buffer = min(int(meta["counts"][split]), max(MIN_SHUFFLE, SHUFFLE_BYTES // per_image))
        ds = ds.shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=True)
    else:
        ds = tf.data.TFRecordDataset(names)  # shard by shard, in manifest row order
    ds = ds.batch(batch_size).map(_parser(meta, with_ids=with_ids, as_float=True),
                                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def load_arrays(processed_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All of one split in memory (for evaluation/reports): uint8 N×S×S×C, int labels, ids."""
    import tensorflow as tf

    meta = read_meta(processed_dir)
    s, c = meta["image_size"], meta["channels"]
    images, labels, ids = [np.zeros((0, s, s, c), np.uint8)], [np.zeros(0, np.int64)], []
    files = _files(processed_dir, split)
    if files:
        parse = _parser(meta, with_ids=True, as_float=False)
        for x, y, i in tf.data.TFRecordDataset(files).batch(1024).map(parse).as_numpy_iterator():
            images.append(x)
            labels.append(y.astype(np.int64))
            ids += [v.decode() for v in i]
    return np.concatenate(images), np.concatenate(labels), ids
