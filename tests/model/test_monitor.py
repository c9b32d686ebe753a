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
BACKBONE = ROOT / "models" / "pretrained" / "efficientnet_lite0_imagenet_notop.keras"
SIZE = 32
BATCH = 80


def champion_model(backbone_path: Path, classes: list[str], x: np.ndarray, y: np.ndarray):
    """The model contract in miniature: Input -> Resizing(64) -> frozen EfficientNet-Lite0 (the repo's vendored
    ImageNet weights) -> 'features' -> GAP -> Dense 'embedding' -> Dense softmax 'probs'. Only the head is
    trained, on pooled features computed once (a few seconds)."""
    import keras

    keras.utils.set_random_seed(0)
    backbone = keras.models.load_model(backbone_path, compile=False)
    backbone.trainable = False
    inputs = keras.Input(x.shape[1:], dtype="float32")
    feats = keras.layers.Activation("linear", name="features")(backbone(keras.layers.Resizing(64, 64)(inputs)))
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(feats)
    emb_layer = keras.layers.Dense(16, activation="relu", name="embedding")
    probs_layer = keras.layers.Dense(len(classes), activation="softmax", name="probs")
    model = keras.Model(inputs, probs_layer(emb_layer(pooled)))
    head_in = keras.Input(pooled.shape[1:])
    head = keras.Model(head_in, probs_layer(emb_layer(head_in)))
    head.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    head.fit(keras.Model(inputs, pooled).predict(x, verbose=0), y, epochs=60, batch_size=32, verbose=0)
    return model  # shares the trained head layers


def build_project(root: Path, source: Path, data: DataConfig, ingest_cfg: IngestConfig) -> SimpleNamespace:
    """Ingest + split ``source``, train the tiny champion, evaluate it on test, write models/champion.json."""
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

    model = champion_model(BACKBONE, classes, *xy("train"))
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
    for need in (MALARIA, BACKBONE):
        if not need.exists():
            pytest.skip(f"embedded test asset missing: {need}")
    # group_pattern None: every cell its own group, so train and test are random halves of one
    # population and a clean batch (random test images) must not alarm.
    data = DataConfig(source=str(MALARIA), group_pattern=None)
    p = build_project(tmp_path_factory.mktemp("monitor"), MALARIA, data, IngestConfig(image_size=SIZE, workers=2))
    from medflow.monitor.simulate import held_out

    p.images, p.labels = held_out(p.source, p.reference.manifest, p.reference.splits, p.data, p.ingest)
    p.params = parse_params({"data": {"source": str(MALARIA), "group_pattern": None}, "ingest": {"image_size": SIZE}})
    return p


def monitor(project: SimpleNamespace, tmp: Path, name: str, **sim) -> dict:
    from medflow.monitor.run import monitor_batch
    from medflow.monitor.simulate import simulate_batch

    batch = tmp / "batches" / name
    simulate_batch(project.images, project.labels, batch, n=BATCH, **sim)
    return monitor_batch(batch, champion_json=project.champion, reference=project.reference,
                         out_root=tmp / "monitoring", params=project.params)
