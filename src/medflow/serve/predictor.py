"""The champion model, loaded once: decode uploads, batched probabilities, Grad-CAM explanations."""

from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from medflow.config import ConfigError, DataConfig, IngestConfig
from medflow.data.images import Decoded, decode_any, to_model_input
from medflow.serve.profile import input_warnings

RECORD_KEYS = ("model_path", "classes", "image_size", "channels", "version")


def load_champion(champion_json: str | Path) -> tuple[dict[str, Any], Path]:
    """Read the champion record; return it and the model file it names.

    A ``model.keras`` beside the record wins (a promoted version folder, e.g. ``models/production``);
    otherwise ``model_path`` is relative to the project root, which holds ``models/champion.json``
    (an absolute ``model_path`` is used as is).
    """
    champion_json = Path(champion_json)
    if not champion_json.is_file():
        raise FileNotFoundError(f"{champion_json}: no champion record (run `medflow compare` or `dvc repro`)")
    folder = champion_json.resolve().parent  # once: a promotion swapping models/production cannot mix versions
    try:
        record = json.loads((folder / champion_json.name).read_text())
        missing = [k for k in RECORD_KEYS if k not in record]
    except (ValueError, AttributeError, TypeError) as e:
        raise ConfigError(f"{champion_json}: not a champion record ({e})") from None
    if missing:
        raise ConfigError(f"{champion_json}: not a champion record (no {', '.join(missing)})")
    beside = folder / "model.keras"
    model_path = beside if beside.is_file() else folder.parent / record["model_path"]
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: model named by {champion_json} is missing")
    return record, model_path


def png_base64(rgb: np.ndarray) -> str:
    """Encode a uint8 RGB (or single-channel) image as base64 PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb.squeeze() if rgb.shape[-1] == 1 else rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Predictor:
    """Loads the champion once (Keras ``safe_mode=True``); all model calls are serialised by a lock."""

    def __init__(self, champion_json: str | Path, data_cfg: DataConfig, ingest_cfg: IngestConfig) -> None:
        from medflow.models.registry import load_model

        self.record, self.model_path = load_champion(champion_json)
        # uploads are sniffed like a monitored batch (format auto): a PNG export of a DICOM-trained task is accepted
        self.data_cfg, self.ingest_cfg = data_cfg.model_copy(update={"format": "auto"}), ingest_cfg
        self.classes: list[str] = list(self.record["classes"])
        self.image_size: int = int(self.record["image_size"])
        self.channels: int = int(self.record["channels"])
        self.version: str = str(self.record["version"])
        # what the training images looked like (medflow.serve.profile); None in records written before it
        profile = self.record.get("input_profile")
        self.profile: dict[str, Any] | None = profile if isinstance(profile, dict) and profile else None
        self.model = load_model(self.model_path)
        expected = (self.image_size, self.image_size, self.channels)
        if tuple(self.model.input_shape[1:]) != expected:
            raise ConfigError(f"{self.model_path}: input {self.model.input_shape[1:]} != champion record {expected}")
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        """Public description of the model (no server paths)."""
        keys = ("model", "version", "classes", "image_size", "channels", "ordered", "metric", "metrics", "created",
                "data_hash", "params_hash")
        return {k: self.record.get(k) for k in keys}

    def decode(self, data: bytes) -> Decoded:
        """Decode uploaded bytes by their content (DICOM or PNG/JPEG/BMP/TIFF); no file name is used."""
        return decode_any(data, "", self.data_cfg, self.ingest_cfg)

    def model_input(self, rgb: np.ndarray) -> np.ndarray:
        """The model's uint8 (S, S, C) input for a decoded RGB image."""
        return to_model_input(rgb, self.image_size, self.channels)

    def warnings(self, decoded: Decoded) -> list[str]:
        """How ``decoded`` differs from the training images (empty: it matches, or the record has no profile)."""
        return input_warnings(decoded, self.profile)

    def probabilities(self, inputs: np.ndarray) -> np.ndarray:
        """Class probabilities (N, K) for a batch of model inputs (N, S, S, C)."""
        with self._lock:
            return np.asarray(self.model.predict_on_batch(inputs.astype(np.float32)), dtype=np.float64)

    def predict(self, decoded: Decoded) -> dict[str, Any]:
        """Probabilities, predicted class, the model input (what the model sees), its Grad-CAM overlay and the
        warnings of an input unlike the training images (:meth:`warnings`)."""
        from medflow.models.gradcam import gradcam, overlay

        x = self.model_input(decoded.rgb)
        proba = self.probabilities(x[None])[0]
        k = int(proba.argmax())
        with self._lock:
            heat = gradcam(self.model, x[None].astype(np.float32), class_index=k)[0]
        return {
            "classes": self.classes,
            "probabilities": [float(p) for p in proba],
            "predicted": self.classes[k],
            "confidence": float(proba[k]),
            "image_png_base64": png_base64(x),
            "gradcam_png_base64": png_base64(overlay(x, heat)),
            "model_version": self.version,
            "input": {"format": decoded.format, "width": decoded.width, "height": decoded.height,
                      "channels": decoded.channels, "bit_depth": decoded.bit_depth},
            "warnings": self.warnings(decoded),
        }
