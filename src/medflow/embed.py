"""Embedding cache for frozen backbones: pooled backbone features of every split, computed once.

``out_dir/<key>/{train,val,test}.npz`` (``x`` float32 N×D, ``y`` int32, ``ids``) + ``cache.json``.
The key depends only on what the features depend on (architecture, weights file hash, input size,
ingest size/channels), so models sharing a backbone share the cache; ``cache.json`` records a hash of
the processed data, and a cache computed from other data is recomputed. Augmentation does not
apply to a cached model (the cache holds the features of the un-augmented images).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medflow.config import ModelConfig, Params
from medflow.data import shards
from medflow.data.manifest import SPLITS
from medflow.io import replace_dir
from medflow.models.weights import resolve_weights, weights_fingerprint

CACHE_INFO = "cache.json"


def uses_embedding_cache(cfg: ModelConfig) -> bool:
    """Frozen backbone whose head is trained on cached embeddings."""
    return cfg.trainable == "none" and cfg.use_embedding_cache


def cache_key(cfg: ModelConfig, weights: str | None, meta: dict, seed: int) -> str:
    """``<architecture>-<input size>px-<hash>``; random weights (None) depend on the seed too."""
    from medflow.models.registry import input_size

    size = input_size(cfg, meta["image_size"])
    ident = {"architecture": cfg.architecture, "weights": weights_fingerprint(weights), "input_size": size,
             "image_size": meta["image_size"], "channels": meta["channels"]}
    if weights is None:
        ident["seed"] = seed
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return f"{cfg.architecture}-{size}px-{digest}"


def data_fingerprint(processed_dir: str | Path) -> str:
    """sha256 over meta.json and every shard file (names and bytes)."""
    root = Path(processed_dir)
    digest = hashlib.sha256((root / shards.META).read_bytes())
    for path in shards.all_shard_files(root):
        digest.update(str(path.relative_to(root)).encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_embeddings(cache_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Cached ``(x float32 N×D, y int32 N, ids)`` of one split."""
    with np.load(Path(cache_dir) / f"{split}.npz") as z:
        return z["x"], z["y"], [str(i) for i in z["ids"]]


def embed(model_name: str, params: Params, processed_dir: str | Path, out_dir: str | Path) -> dict:
    """Compute (or reuse) the embedding cache of a frozen model; other models are skipped (``cached: False``)."""
    cfg = params.model(model_name)
    if not uses_embedding_cache(cfg):
        return {"model": model_name, "cached": False,
                "reason": "backbone is trained (or use_embedding_cache is off): trains end to end"}
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
        if info.get("data") == fingerprint and all((cache_dir / f"{s}.npz").exists() for s in SPLITS):
            return summary | {"reused": True, "dim": info["dim"], "counts": info["counts"], "seconds": 0.0}

    start = time.perf_counter()
    keras.utils.set_random_seed(params.train.seed)  # a random (weights: null) backbone is reproducible
    model = build_model(cfg, len(meta["classes"]), meta["image_size"], meta["channels"], weights=weights)
    extractor = keras.Model(model.inputs, model.get_layer(EMBEDDING).output)
    import tensorflow as tf

    shape = (None, meta["image_size"], meta["image_size"], meta["channels"])  # one trace for every batch size
    features = tf.function(lambda x: extractor(x, training=False),
                           input_signature=[tf.TensorSpec(shape, tf.float32)])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{key}.", suffix=".tmp"))
    counts: dict[str, int] = {}
    try:
        for split in SPLITS:
            xs, ys, ids = [np.zeros((0, extractor.output.shape[-1]), np.float32)], [np.zeros(0, np.int32)], []
            ds = shards.dataset(processed_dir, split, batch_size=cfg.batch_size, with_ids=True)
            batches = -(-int(meta["counts"].get(split, 0)) // cfg.batch_size)
            for x, y, i in tqdm(ds, total=batches, desc=f"embed {key} {split}", unit="batch", file=sys.stderr):
                xs.append(np.asarray(features(x), np.float32))
                ys.append(y.numpy().astype(np.int32))
                ids += [v.decode() for v in i.numpy()]
            np.savez(tmp / f"{split}.npz", x=np.concatenate(xs), y=np.concatenate(ys), ids=np.array(ids, dtype=str))
            counts[split] = len(ids)
        dim = int(extractor.output.shape[-1])
        (tmp / CACHE_INFO).write_text(json.dumps(
            {"key": key, "architecture": cfg.architecture, "weights": weights_fingerprint(weights),
             "data": fingerprint, "dim": dim, "counts": counts}, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, cache_dir)
    seconds = time.perf_counter() - start
    total = sum(counts.values())
    print(f"embed {model_name}: {total} images -> {dim}-d at {cache_dir} ({seconds:.1f}s, "
          f"{total / max(seconds, 1e-9):.0f} img/s)", file=sys.stderr)
    return summary | {"reused": False, "dim": dim, "counts": counts, "seconds": round(seconds, 2)}
