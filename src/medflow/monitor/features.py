"""Per-image monitoring features: image statistics (from the manifest), champion embeddings reduced by a
PCA fitted on the reference, predicted class and confidence. The reference (the champion's train split)
is computed once per champion version and reference data, and cached."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medflow.io import atomic_write
from medflow.monitor import MonitorConfig

# Manifest columns compared batch vs reference: brightness, contrast, sharpness, colour, size as found.
IMAGE_FEATURES = ("mean", "std", "sharpness", "mean_r", "mean_g", "mean_b", "width", "height")


def pc_columns(k: int) -> list[str]:
    """Names of the embedding principal-component columns."""
    return [f"emb_pc{i}" for i in range(k)]


@dataclass(frozen=True)
class ReferenceData:
    """The data the champion was trained on: ingest outputs and the split assignment (train rows are used)."""

    manifest: Path
    pixels: Path
    splits: Path


@dataclass(frozen=True)
class Projection:
    """PCA of the embeddings fitted on the reference: ``(x - mean) @ components.T``."""

    mean: np.ndarray
    components: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T


@dataclass
class Champion:
    """The champion record, its loaded Keras model and a sub-model giving (embedding, probs)."""

    record: dict[str, Any]
    model_path: Path
    model: Any

    @property
    def classes(self) -> list[str]:
        return list(self.record["classes"])

    @property
    def version(self) -> str:
        return str(self.record.get("version") or self.record["model"])

    def outputs(self, pixels: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (N, D) and class probabilities (N, K) for uint8 model inputs (N, S, S, C)."""
        import keras

        sub = keras.Model(self.model.inputs, [self.model.get_layer("embedding").output,
                                              self.model.get_layer("probs").output])
        embs, probs = [], []
        for start in range(0, len(pixels), batch_size):
            e, p = sub.predict_on_batch(pixels[start:start + batch_size].astype(np.float32))
            embs.append(np.asarray(e, dtype=np.float32).reshape(len(e), -1))
            probs.append(np.asarray(p, dtype=np.float64))
        if not embs:
            dim = int(np.prod(sub.outputs[0].shape[1:]))
            return np.zeros((0, dim), np.float32), np.zeros((0, len(self.classes)))
        return np.concatenate(embs), np.concatenate(probs)


def load_champion(champion_json: str | Path) -> Champion:
    """Read ``models/champion.json`` and load the model it names (checked against image size/channels)."""
    from medflow.models.registry import load_model
    from medflow.serve.predictor import load_champion as read_record

    record, model_path = read_record(champion_json)
    model = load_model(model_path)
    expected = (int(record["image_size"]), int(record["image_size"]), int(record["channels"]))
    if tuple(model.input_shape[1:]) != expected:
        raise ValueError(f"{model_path}: model input {model.input_shape[1:]} != champion record {expected}")
    return Champion(record, model_path, model)


def model_inputs(manifest: pd.DataFrame, pixels: np.ndarray) -> np.ndarray:
    """The uint8 model inputs of the manifest's rows (``row`` indexes ``pixels``)."""
    return np.asarray(pixels[manifest["row"].to_numpy(dtype=int)])


def feature_frame(manifest: pd.DataFrame, emb: np.ndarray, proba: np.ndarray, projection: Projection,
                  classes: list[str]) -> pd.DataFrame:
    """One row per manifest row: id, label, image features, embedding PCs, prediction, confidence."""
    pcs = projection.transform(emb).reshape(len(emb), len(projection.components))
    frame = pd.DataFrame({"id": manifest["id"].astype(str).to_numpy(),
                          "label": manifest["label"].astype(str).to_numpy()})
    for col in IMAGE_FEATURES:
        frame[col] = manifest[col].to_numpy(dtype=float)
    for i, col in enumerate(pc_columns(pcs.shape[1])):
        frame[col] = pcs[:, i]
    frame["prediction"] = np.asarray(classes, dtype=object)[proba.argmax(axis=1)] if len(proba) else []
    frame["confidence"] = proba.max(axis=1) if len(proba) else []
    return frame


def _cache_key(champion: Champion, ref: ReferenceData, cfg: MonitorConfig) -> str:
    h = hashlib.sha256()
    for path in (ref.manifest, ref.splits, champion.model_path):
        h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    h.update(f"{cfg.embedding_components}|{cfg.reference_max_rows}|{cfg.seed}".encode())
    return h.hexdigest()[:12]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def reference_features(champion: Champion, ref: ReferenceData, cache_dir: str | Path,
                       cfg: MonitorConfig) -> tuple[pd.DataFrame, Projection, Path]:
    """Features of the champion's training rows (split ``train``), cached as
    ``cache_dir/reference-<version>-<key>.parquet`` (+ ``.pca.npz``); key = hash of manifest, splits,
    model file and the feature settings. Returns (frame, projection, parquet path)."""
    cache_dir = Path(cache_dir)
    stem = f"reference-{_safe(champion.version)}-{_cache_key(champion, ref, cfg)}"  # versions may hold dots
    parquet, pca_file = cache_dir / f"{stem}.parquet", cache_dir / f"{stem}.pca.npz"
    if parquet.is_file() and pca_file.is_file():
        with np.load(pca_file) as z:
            return pd.read_parquet(parquet), Projection(z["mean"], z["components"]), parquet

    from sklearn.decomposition import PCA

    manifest = pd.read_csv(ref.manifest, dtype={"id": str, "label": str})
    splits = pd.read_csv(ref.splits, dtype={"id": str})
    train = manifest[manifest["id"].isin(splits.loc[splits["split"] == "train", "id"])]
    if train.empty:
        raise ValueError(f"{ref.splits}: no train rows of {ref.manifest} (the champion's reference data)")
    if len(train) > cfg.reference_max_rows:
        train = train.sample(cfg.reference_max_rows, random_state=cfg.seed).sort_index()
    pixels = np.load(ref.pixels, mmap_mode="r")
    size = int(champion.record["image_size"])
    if pixels.shape[1:3] != (size, size):
        raise ValueError(f"{ref.pixels}: images are {pixels.shape[1:3]}, the champion expects {size}x{size}")
    emb, proba = champion.outputs(model_inputs(train, pixels), cfg.batch_size)
    k = min(cfg.embedding_components, emb.shape[1], len(emb))
    pca = PCA(n_components=k, svd_solver="full").fit(emb)
    projection = Projection(pca.mean_, pca.components_)
    frame = feature_frame(train, emb, proba, projection, champion.classes)
    buf = io.BytesIO()
    np.savez(buf, mean=pca.mean_, components=pca.components_)
    atomic_write(pca_file, buf.getvalue())
    atomic_write(parquet, frame.to_parquet(index=False))
    return frame, projection, parquet
