"""Batch monitoring end to end on the embedded malaria sample at 32 px: real ingest of simulated batches,
a tiny champion trained for a few epochs, Evidently drift + classification reports, verdicts."""

from __future__ import annotations

import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from medflow.config import DataConfig, IngestConfig, SplitConfig, parse_params  # noqa: E402
from medflow.monitor import MonitorConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MALARIA = ROOT / "data" / "raw" / "malaria-cells-400"
SIZE = 32
BATCH = 80


def tiny_champion_model(num_classes: int, size: int, channels: int = 3):
    """The model contract in miniature: Input -> Conv2D -> 'features' -> GAP -> 'embedding' -> 'probs'."""
    import keras

    inputs = keras.Input((size, size, channels), dtype="float32")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(16, 3, activation="relu", padding="same")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(32, 3, activation="relu", padding="same", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, activation="relu", name="embedding")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs)


def build_project(root: Path, source: Path, data: DataConfig, ingest_cfg: IngestConfig, epochs: int) -> SimpleNamespace:
    """Ingest + split ``source``, train the tiny champion, evaluate it on test, write models/champion.json."""
    import keras

    from medflow.data.ingest import ingest
    from medflow.data.split import run_split
    from medflow.evaluate import compute_metrics
    from medflow.monitor.features import ReferenceData

    interim = root / "data" / "interim"
    summary = ingest(source, interim, data, ingest_cfg, progress=False)
    run_split(interim / "manifest.csv", interim / "splits.csv", root / "reports" / "split_counts.csv", SplitConfig())
    classes = summary["classes"]
    manifest = pd.read_csv(interim / "manifest.csv", dtype={"id": str, "label": str})
    splits = pd.read_csv(interim / "splits.csv", dtype={"id": str})
    df = manifest.merge(splits, on="id")
    pixels = np.load(interim / "pixels.npy")

    def xy(split: str) -> tuple[np.ndarray, np.ndarray]:
        part = df[df["split"] == split]
        return pixels[part["row"]].astype("float32"), part["label"].map(classes.index).to_numpy()

    keras.utils.set_random_seed(0)
    model = tiny_champion_model(len(classes), ingest_cfg.image_size, ingest_cfg.channels)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = xy("train")
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    (root / "models" / "tiny").mkdir(parents=True)
    model.save(root / "models" / "tiny" / "model.keras")
    xt, yt = xy("test")
    metrics = compute_metrics(yt, model.predict(xt, verbose=0), classes, bootstrap=0)
    champion = {"model": "tiny", "model_path": "models/tiny/model.keras", "classes": classes,
                "image_size": ingest_cfg.image_size, "channels": ingest_cfg.channels, "ordered": False,
                "metric": "macro_f1", "metrics": metrics, "data_hash": "x", "params_hash": "y",
                "version": "tiny-test0001", "created": "2025-01-01T00:00:00+00:00"}
    (root / "models" / "champion.json").write_text(json.dumps(champion))
    return SimpleNamespace(root=root, source=source, champion=root / "models" / "champion.json", metrics=metrics,
                           reference=ReferenceData(interim / "manifest.csv", interim / "pixels.npy", interim / "splits.csv"),
                           classes=classes, data=data, ingest=ingest_cfg)


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    if not MALARIA.is_dir():
        pytest.skip(f"embedded malaria sample missing at {MALARIA}")
    p = build_project(tmp_path_factory.mktemp("monitor"), MALARIA, DataConfig(source=str(MALARIA)),
                      IngestConfig(image_size=SIZE, workers=2), epochs=8)
    from medflow.monitor.simulate import held_out

    p.images, p.labels = held_out(p.source, p.reference.manifest, p.reference.splits, p.data, p.ingest)
    p.params = parse_params({"data": {"source": str(MALARIA)}, "ingest": {"image_size": SIZE}})
    return p


def monitor(project: SimpleNamespace, tmp: Path, name: str, **sim) -> dict:
    from medflow.monitor.run import monitor_batch
    from medflow.monitor.simulate import simulate_batch

    batch = tmp / "batches" / name
    simulate_batch(project.images, project.labels, batch, n=BATCH, **sim)
    return monitor_batch(batch, champion_json=project.champion, reference=project.reference,
                         out_root=tmp / "monitoring", params=project.params)
