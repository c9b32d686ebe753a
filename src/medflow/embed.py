"""Embedding cache for frozen backbones: pooled backbone features of the splits a head trains on, computed once.

``out_dir/<key>/{train,val}.npz`` (``x`` float32 N×D, ``y`` int32, ``ids``) + ``cache.json``; the test
split is embedded only when asked for (``splits``): evaluation runs the saved full model on it.
The key depends only on what the features depend on (architecture, weights file hash, input size,
ingest size/channels), so models sharing a backbone share the cache; ``cache.json`` records a hash of
the processed data, and a cache computed from other data is recomputed. Augmentation does not
apply to a cached model (the cache holds the features of the un-augmented images).

``out_dir/<model>.json`` records which cache a model uses (key, data hash, dimension), or that it uses
none: ``train@<model>`` depends on that file alone, so a change to one model's backbone retrains that
model only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medflow.concurrency import ordered_map
from medflow.config import ModelConfig, Params
from medflow.data import shards
from medflow.data.manifest import SPLITS
from medflow.io import atomic_write_json, replace_dir
from medflow.models.weights import resolve_weights, weights_fingerprint
from medflow.progress import progress_bar
from medflow.runtime import gc_frozen

if TYPE_CHECKING:
    import keras

CACHE_INFO = "cache.json"
TRAINING_SPLITS = ("train", "val")  # what a head trains on (train) and early-stops on (val)
def uses_embedding_cache(cfg: ModelConfig) -> bool:
    """Frozen backbone whose head is trained on cached embeddings."""
    return cfg.trainable == "none" and cfg.use_embedding_cache


@lru_cache(maxsize=1)
def _feature_code() -> str:
    """sha256 of the code that computes the features (the model-building modules) and the Keras version:
    a cache computed by other code is not reused."""
    import keras

    from medflow.models import backbones, layers, registry

    h = hashlib.sha256(keras.__version__.encode())
    for module in (registry, backbones, layers):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def cache_key(cfg: ModelConfig, weights: str | None, meta: dict, seed: int) -> str:
    """``<architecture>-<input size>px-<hash>``; the hash also covers the feature code (:func:`_feature_code`)
    and the dtype policy; random weights (None) depend on the seed too."""
    import keras

    from medflow.models.registry import input_size

    size = input_size(cfg, meta["image_size"])
    ident = {"architecture": cfg.architecture, "weights": weights_fingerprint(weights), "input_size": size,
             "image_size": meta["image_size"], "channels": meta["channels"], "code": _feature_code(),
             "dtype_policy": keras.config.dtype_policy().name}
    if weights is None:
        ident["seed"] = seed
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return f"{cfg.architecture}-{size}px-{digest}"


def data_fingerprint(processed_dir: str | Path) -> str:
    """sha256 over meta.json and every shard file (names and bytes); memoised on the files' sizes and
    mtimes (``embed`` and ``train`` both ask for it)."""
    root = Path(processed_dir).resolve()
    files = (root / shards.META, *shards.all_shard_files(root))
    return _fingerprint(root, tuple((p, (st := p.stat()).st_size, st.st_mtime_ns) for p in files))


@lru_cache(maxsize=8)
def _fingerprint(root: Path, files: tuple[tuple[Path, int, int], ...]) -> str:
    """:func:`data_fingerprint` of ``files`` (meta.json first; path, size and mtime each: the memo key)."""
    meta, *data = (path for path, _, _ in files)
    digest = hashlib.sha256(meta.read_bytes())
    for path in data:
        digest.update(str(path.relative_to(root)).encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_embeddings(cache_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Cached ``(x float32 N×D, y int32 N, ids)`` of one split."""
    with np.load(Path(cache_dir) / f"{split}.npz") as z:
        return z["x"], z["y"], [str(i) for i in z["ids"]]


@gc_frozen()
def embed(model_name: str, params: Params, processed_dir: str | Path, out_dir: str | Path, *,
          splits: Sequence[str] = TRAINING_SPLITS) -> dict:
    """Compute (or reuse) the embedding cache of ``splits`` for a frozen model; other models are skipped
    (``cached: False``). A cache holding more splits than asked for is reused."""
    cfg = params.model(model_name)
    if not uses_embedding_cache(cfg):
        _write_record(out_dir, model_name, {"cached": False})
        return {"model": model_name, "cached": False,
                "reason": "backbone is trained (or use_embedding_cache is off): trains end to end"}
    if unknown := set(splits) - set(SPLITS):
        raise ValueError(f"splits must be among {SPLITS}, got {sorted(unknown)}")
    wanted = [s for s in SPLITS if s in splits]
    import keras

    from medflow.models.registry import EMBEDDING, build_model, input_size

    meta = shards.read_meta(processed_dir)
    weights = resolve_weights(cfg, input_size(cfg, meta["image_size"]))
    key = cache_key(cfg, weights, meta, params.train.seed)
    cache_dir = Path(out_dir) / key
    fingerprint = data_fingerprint(processed_dir)
    summary = {"model": model_name, "cached": True, "key": key, "dir": str(cache_dir)}
    info_path = cache_dir / CACHE_INFO
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("data") == fingerprint and all((cache_dir / f"{s}.npz").exists() for s in wanted):
            _write_record(out_dir, model_name, {"cached": True, "key": key, "data": fingerprint, "dim": info["dim"]})
            return summary | {"reused": True, "dim": info["dim"], "counts": info["counts"], "seconds": 0.0}

    start = time.perf_counter()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{key}.", suffix=".tmp"))
    try:
        keras.utils.set_random_seed(params.train.seed)  # a random (weights: null) backbone is reproducible
        model = build_model(cfg, len(meta["classes"]), meta["image_size"], meta["channels"], weights=weights)
        extractor = keras.Model(model.input, model.get_layer(EMBEDDING).output)
        counts = _write_splits(extractor, processed_dir, meta, cfg.batch_size, tmp, wanted, desc=f"embed {key}")
        dim = int(extractor.output.shape[-1])
        (tmp / CACHE_INFO).write_text(json.dumps(
            {"key": key, "architecture": cfg.architecture, "weights": weights_fingerprint(weights),
             "data": fingerprint, "dim": dim, "counts": counts}, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, cache_dir)
    _write_record(out_dir, model_name, {"cached": True, "key": key, "data": fingerprint, "dim": dim})
    seconds = time.perf_counter() - start
    total = sum(counts.values())
    print(f"embed {model_name}: {total} images -> {dim}-d at {cache_dir} ({seconds:.1f}s, "
          f"{total / max(seconds, 1e-9):.0f} img/s)", file=sys.stderr)
    return summary | {"reused": False, "dim": dim, "counts": counts, "seconds": round(seconds, 2)}


def prune(out_dir: str | Path, models: Sequence[str]) -> list[str]:
    """Remove from ``out_dir`` the caches no record of ``models`` points to, and the records of other models;
    the removed names. Only folders holding a ``cache.json`` count as caches (temporary ones start with a dot).
    Old caches stay in DVC's cache, so ``dvc checkout`` of an older commit brings them back."""
    out_dir = Path(out_dir)
    keep: set[str] = set()
    removed = []
    for path in sorted(out_dir.glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("model", path.stem) in models:
            keep.add(record.get("key", ""))
        else:
            path.unlink()
            removed.append(path.name)
    for folder in sorted(out_dir.iterdir()):
        if folder.is_dir() and not folder.name.startswith(".") and (folder / CACHE_INFO).exists() \
                and folder.name not in keep:
            shutil.rmtree(folder)
            removed.append(folder.name)
    return removed


def _write_record(out_dir: str | Path, model_name: str, record: dict) -> None:
    """``out_dir/<model>.json``: the cache the model's head trains on (no times: unchanged unless it changes)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(out_dir) / f"{model_name}.json", {"model": model_name, **record})


def _write_splits(extractor: keras.Model, processed_dir: str | Path, meta: dict, batch_size: int, out: Path,
                  splits: Sequence[str], desc: str) -> dict[str, int]:
    """Embed the images of ``splits`` (read from the memory-mapped shards) and write ``out/<split>.npz``;
    the image count of each split."""
    records = {s: _records(processed_dir, meta, s) for s in splits}
    counts = {s: sum(len(r) for r in parts) for s, parts in records.items()}
    x = _embed_images(extractor, [r["image"] for parts in records.values() for r in parts], batch_size, desc)
    offset = 0
    for split, parts in records.items():
        ids = shards.read_ids(processed_dir, split)
        labels, positions = (np.concatenate([np.zeros(0, np.int32), *(r[f] for r in parts)])
                             for f in ("label", "position"))
        np.savez(out / f"{split}.npz", x=x[offset:offset + counts[split]], y=labels.astype(np.int32),
                 ids=np.array([ids[i] for i in positions], dtype=str))
        offset += counts[split]
    return counts


def _embed_images(extractor: keras.Model, parts: list[np.ndarray], batch_size: int, desc: str) -> np.ndarray:
    """``extractor``'s float32 outputs for the uint8 images of ``parts``, in order.

    All parts run as one stream of equal batches (at most ``batch_size``; the last one zero-padded), so the
    extractor is traced once, for one batch shape. Two batches are in flight at a time: the cores that one
    leaves idle in its small layers work on the other.
    """
    import tensorflow as tf

    total = sum(len(p) for p in parts)
    if not total:
        return np.zeros((0, extractor.output.shape[-1]), np.float32)
    n_batches = -(-total // batch_size)
    shape = (-(-total // n_batches), *parts[0].shape[1:])
    traced = tf.function(lambda x: extractor(tf.cast(x, tf.float32), training=False),
                         input_signature=[tf.TensorSpec(shape, tf.uint8)], autograph=False)
    done = ordered_map(lambda b: np.asarray(traced(b), np.float32), _batches(parts, shape), 2, name="embed")
    return np.concatenate(list(progress_bar(done, total=n_batches, desc=desc, unit="batch")))[:total]


def _records(processed_dir: str | Path, meta: dict, split: str) -> list[np.ndarray]:
    """The shards of one split as memory-mapped record arrays (``label``, ``position``, ``image``), in order."""
    dtype = shards.record_dtype(meta["image_size"], meta["channels"])
    return [np.memmap(Path(processed_dir) / split / name, dtype, mode="r") for name in meta["shards"].get(split, [])]


def _batches(parts: Iterable[np.ndarray], shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """The rows of ``parts`` (arrays of ``shape[1:]`` items) regrouped into arrays of exactly ``shape``:
    batches may span parts; the last one is zero-padded."""
    pending: list[np.ndarray] = []
    filled = 0
    for part in parts:
        start = 0
        while start < len(part):
            take = min(shape[0] - filled, len(part) - start)
            pending.append(part[start:start + take])
            filled, start = filled + take, start + take
            if filled == shape[0]:
                yield np.concatenate(pending)
                pending, filled = [], 0
    if filled:
        yield np.concatenate([*pending, np.zeros((shape[0] - filled, *shape[1:]), pending[0].dtype)])
