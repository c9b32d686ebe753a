"""Training: input pipeline, embedding cache, resume after a kill, outputs (tiny data, seconds per test)."""

from __future__ import annotations

import csv
import gc
import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from _tfrecords import make_processed  # noqa: E402

from medflow.config import Augment, ModelConfig, Params, parse_params  # noqa: E402
from medflow.data import shards  # noqa: E402
from medflow.embed import embed, load_embeddings  # noqa: E402
from medflow.models.registry import build_head, build_model, load_model  # noqa: E402
from medflow.models.weights import WeightsUnavailable  # noqa: E402
from medflow.runtime import gc_frozen  # noqa: E402
from medflow.train import (  # noqa: E402
    HISTORY_COLUMNS,
    _create_training_state,
    averaged_weights,
    class_weights,
    datasets,
    train,
)

ROOT = Path(__file__).resolve().parents[2]
LITE0 = ROOT / "models" / "pretrained" / "efficientnet_lite0_imagenet_notop.keras"
CNN = {"architecture": "basic_cnn", "input_size": 32, "head_units": 8, "epochs": 2, "batch_size": 4,
       "augment": {"flip": True, "rotation": 0.1}}


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_processed(tmp_path_factory.mktemp("data"), {"train": 12, "val": 8, "test": 4})


def _params(**models: dict) -> Params:
    return parse_params({"train": {"seed": 3, "patience": 5, "lr_patience": 2}, "models": models})


def _history(out: Path) -> list[dict]:
    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_augmentation_only_touches_training_batches(processed: Path) -> None:
    strong = Augment(flip=True, rotation=0.25, zoom=0.2, shift=0.2, brightness=0.3, contrast=0.3)
    cfg = ModelConfig(architecture="basic_cnn", batch_size=4, augment=strong)
    train_ds, val_ds = datasets(cfg, processed, seed=0)

    raw_val, val_labels, _ = shards.load_arrays(processed, "val")
    val = list(val_ds.as_numpy_iterator())
    np.testing.assert_array_equal(np.concatenate([x for x, _ in val]), raw_val.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([y for _, y in val]), val_labels)

    raw_train = shards.load_arrays(processed, "train")[0].astype(np.float32)

    def unchanged(ds) -> int:  # noqa: ANN001 - images found verbatim among the raw training images
        images = np.concatenate([x for x, _ in ds.as_numpy_iterator()])
        return sum(any(np.array_equal(img, r) for r in raw_train) for img in images)

    assert unchanged(train_ds) == 0  # every training image is altered
    plain_train, _ = datasets(cfg.model_copy(update={"augment": Augment(flip=False)}), processed, seed=0)
    assert unchanged(plain_train) == len(raw_train)  # control: without augmentation all are verbatim


def test_balanced_class_weights() -> None:
    meta = {"classes": ["a", "b", "c"], "class_counts": {"train": {"a": 60, "b": 30, "c": 10}}}
    assert class_weights(meta, "balanced") == pytest.approx({0: 100 / 180, 1: 100 / 90, 2: 100 / 30})
    assert class_weights(meta, "none") is None


def test_train_end_to_end_writes_contract_outputs(processed: Path, tmp_path: Path) -> None:
    out = tmp_path / "basic_cnn"
    summary = train("basic_cnn", _params(basic_cnn=CNN), processed, tmp_path / "emb", out)

    rows = _history(out)
    assert list(rows[0]) == HISTORY_COLUMNS and [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["loss"]) > 0 and 0 <= float(r["val_accuracy"]) <= 1 and float(r["lr"]) > 0 for r in rows)
    saved = json.loads((out / "train_summary.json").read_text())
    assert saved == summary and summary["epochs_run"] == 2 and summary["resumed_from_epoch"] is None
    assert summary["best"]["val_loss"] == min(float(r["val_loss"]) for r in rows)
    # basic_cnn trains every layer; only its BatchNorm moving mean/variance are non-trainable
    assert summary["params"]["total"] - summary["params"]["trainable"] == 2 * (32 + 64 + 128)
    assert summary["images_per_second"] > 0 and summary["weights_fingerprint"] == "none"
    assert (out / "dvclive" / "metrics.json").exists() and (out / "dvclive" / "plots" / "metrics").is_dir()
    assert not (out / "backup").exists()  # finished runs leave no resume state
    assert keras.config.dtype_policy().name == "float32"

    model = keras.models.load_model(out / "model.keras", safe_mode=True)
    for name in ("features", "embedding", "probs"):
        assert model.get_layer(name) is not None
    assert not [layer for layer in model.layers if type(layer).__name__.startswith("Random")]
    x, _, _ = shards.load_arrays(processed, "test")
    p1, p2 = model.predict(x.astype("float32"), verbose=0), model.predict(x.astype("float32"), verbose=0)
    np.testing.assert_array_equal(p1, p2)  # inference is deterministic: no augmentation in the model
    np.testing.assert_allclose(p1.sum(axis=1), 1.0, rtol=1e-5)


class SimulatedKill(Exception):
    pass


class _Kill(keras.callbacks.Callback):
    """Dies at the end of epoch ``at`` (0-based), like a killed process; records the epochs it saw."""

    def __init__(self, at: int | None) -> None:
        super().__init__()
        self.at, self.seen = at, []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seen.append(epoch)
        if epoch == self.at:
            raise SimulatedKill(f"killed after epoch {epoch + 1}")


def test_resume_after_kill_continues_from_last_epoch(processed: Path, tmp_path: Path) -> None:
    params = _params(basic_cnn=CNN | {"epochs": 3})
    out = tmp_path / "basic_cnn"
    first = _Kill(at=1)
    with pytest.raises(SimulatedKill):
        train("basic_cnn", params, processed, tmp_path / "emb", out, callbacks=[first])
    assert first.seen == [0, 1] and not (out / "model.keras").exists()
    assert [int(r["epoch"]) for r in _history(out)] == [1, 2] and (out / "backup").is_dir()
    before = _history(out)

    second = _Kill(at=None)
    summary = train("basic_cnn", params, processed, tmp_path / "emb", out, callbacks=[second])
    assert second.seen == [2]  # only the third epoch ran
    assert summary["resumed_from_epoch"] == 2 and summary["epochs_this_run"] == 1 and summary["epochs_run"] == 3
    rows = _history(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and rows[:2] == before
    with open(out / "dvclive" / "plots" / "metrics" / "eval" / "loss.tsv", newline="") as f:  # DVCLive's val_loss
        logged = list(csv.DictReader(f, delimiter="\t"))
    assert [int(r["step"]) for r in logged] == [0, 1, 2]  # DVCLive continues its steps too
    assert [float(r["loss"]) for r in logged] == [float(r["val_loss"]) for r in rows]
    assert (out / "model.keras").exists() and not (out / "backup").exists()


def test_resume_restores_early_stopping_and_lr_plateau_counters(processed: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, list[tuple[int, int, float | None]]] = {"stop": [], "plateau": []}

    def recording(base: type, key: str) -> type:
        class Recording(base):  # type: ignore[misc, valid-type]
            def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
                seen[key].append((epoch, self.wait, self.best))

        return Recording

    monkeypatch.setattr(keras.callbacks, "EarlyStopping", recording(keras.callbacks.EarlyStopping, "stop"))
    monkeypatch.setattr(keras.callbacks, "ReduceLROnPlateau", recording(keras.callbacks.ReduceLROnPlateau, "plateau"))
    params = parse_params({"train": {"seed": 3, "patience": 50, "lr_patience": 50}, "models": {"basic_cnn": CNN | {"epochs": 3}}})
    out = tmp_path / "basic_cnn"
    with pytest.raises(SimulatedKill):
        train("basic_cnn", params, processed, tmp_path / "emb", out, callbacks=[_Kill(at=1)])
    val_loss = [float(r["val_loss"]) for r in _history(out)]
    # after epoch 2: the best val_loss so far and the epochs since it (Keras counts strict improvements)
    expected = (2, len(val_loss) - 1 - int(np.argmin(val_loss)), min(val_loss))
    train("basic_cnn", params, processed, tmp_path / "emb", out)
    for key in ("stop", "plateau"):
        epoch, wait, best = seen[key][2]  # the first epoch of the resumed run
        assert (epoch, wait) == expected[:2] and best == pytest.approx(expected[2], rel=1e-6), key


def test_backup_of_another_config_is_not_resumed(processed: Path, tmp_path: Path) -> None:
    out = tmp_path / "basic_cnn"
    with pytest.raises(SimulatedKill):
        train("basic_cnn", _params(basic_cnn=CNN), processed, tmp_path / "emb", out, callbacks=[_Kill(at=0)])
    changed = _params(basic_cnn=CNN | {"learning_rate": 0.01})
    summary = train("basic_cnn", changed, processed, tmp_path / "emb", out)
    assert summary["resumed_from_epoch"] is None and [int(r["epoch"]) for r in _history(out)] == [1, 2]


def test_frozen_backbone_trains_head_on_shared_cache(processed: Path, tmp_path: Path) -> None:
    assert LITE0.exists(), f"vendored backbone {LITE0} missing (shipped in the repository)"
    frozen = {"architecture": "keras_file", "weights": str(LITE0), "trainable": "none", "input_size": 32,
              "head_units": 0, "dropout": 0.2, "epochs": 2, "batch_size": 4, "augment": {"flip": False}}
    params = _params(lite=frozen, lite_wide=frozen | {"head_units": 16})
    emb = tmp_path / "emb"
    first = embed("lite", params, processed, emb)
    assert first["cached"] and not first["reused"] and first["dim"] == 1280
    assert first["counts"] == {"train": 12, "val": 8}  # what the head trains on; evaluate embeds test itself
    assert sorted(p.name for p in Path(first["dir"]).glob("*.npz")) == ["train.npz", "val.npz"]
    x, y, ids = load_embeddings(first["dir"], "val")
    assert x.shape == (8, 1280) and x.dtype == np.float32
    assert list(y) == list(shards.load_arrays(processed, "val")[1])
    assert embed("basic", _params(basic=CNN), processed, emb)["cached"] is False
    # per-model records, what train@<model> depends on: a change to one model's backbone retrains it alone
    record = json.loads((emb / "lite.json").read_text())
    assert record == {"model": "lite", "cached": True, "key": first["key"], "data": record["data"], "dim": 1280}
    assert json.loads((emb / "basic.json").read_text()) == {"model": "basic", "cached": False}
    other = embed("lite", _params(lite=frozen | {"input_size": 48}), processed, emb)
    assert other["key"] != first["key"] and json.loads((emb / "lite.json").read_text())["key"] == other["key"]

    summary = train("lite_wide", params, processed, emb, tmp_path / "lite_wide")
    assert summary["embedding_cache"] == first["key"]  # a second head on the same backbone reuses the cache
    assert embed("lite_wide", params, processed, emb)["reused"] is True
    assert summary["params"]["trainable"] == 1280 * 16 + 16 + 16 * 2 + 2  # only the head trained

    model = load_model(tmp_path / "lite_wide" / "model.keras")  # the FULL model: backbone + trained head
    images = shards.load_arrays(processed, "val")[0].astype("float32")
    embedded, probs = keras.Model(model.input, [model.get_layer("embedding").output, model.output]).predict(
        images, verbose=0)
    np.testing.assert_allclose(embedded, x, rtol=1e-4, atol=1e-4)  # the backbone is the cached one
    head_only = keras.Sequential([model.get_layer("head"), model.get_layer("probs")])
    np.testing.assert_allclose(probs, head_only.predict(x, verbose=0), atol=1e-5)  # and the head the trained one
    best = min(_history(tmp_path / "lite_wide"), key=lambda r: float(r["val_loss"]))
    val_loss = keras.losses.sparse_categorical_crossentropy(y, probs)
    assert float(np.mean(val_loss)) == pytest.approx(float(best["val_loss"]), rel=1e-3)  # best epoch's weights


def test_frozen_head_is_the_same_whether_train_built_the_cache_or_found_it(processed: Path, tmp_path: Path) -> None:
    frozen = {"architecture": "mobilenet_v2", "trainable": "none", "input_size": 32, "head_units": 8,
              "epochs": 1, "batch_size": 4, "augment": {"flip": False}}
    params, emb = _params(mnv2=frozen), tmp_path / "emb"
    train("mnv2", params, processed, emb, tmp_path / "built")  # cache missing: train() embeds first
    train("mnv2", params, processed, emb, tmp_path / "found")  # cache present
    built, found = (load_model(tmp_path / d / "model.keras") for d in ("built", "found"))
    for a, b in zip(built.get_layer("head").get_weights(), found.get_layer("head").get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_class_weights_and_early_stopping_reach_fit(tmp_path: Path) -> None:
    """A frozen linear head with a vanishing learning rate: its loss is the initial model's, so epoch 1's
    training loss must be the class-weighted mean of the per-image losses, and an unchanging val_loss must
    stop training after ``patience`` epochs without improvement."""
    processed = make_processed(tmp_path / "unbalanced", {"train": 12, "val": 8}, every=4)  # train: 9 a, 3 b
    meta = shards.read_meta(processed)
    assert meta["class_counts"]["train"] == {"a": 9, "b": 3}
    head = {"architecture": "keras_file", "weights": str(LITE0), "trainable": "none", "input_size": 32,
            "head_units": 0, "dropout": 0.0,
            "learning_rate": 1e-30, "epochs": 10, "batch_size": 12, "keep": "last", "augment": {"flip": False}}
    images, labels, _ = shards.load_arrays(processed, "train")
    losses = {}
    for mode in ("balanced", "none"):
        params = parse_params({"train": {"seed": 3, "patience": 2, "lr_patience": 50},
                               "models": {"head": head | {"class_weight": mode}}})
        out = tmp_path / mode
        summary = train("head", params, processed, tmp_path / "emb", out)
        assert summary["stopped_early"] and summary["epochs_run"] == 3  # best at epoch 1, then 2 without gain
        assert len({r["val_loss"] for r in _history(out)}) == 1
        probs = load_model(out / "model.keras").predict(images.astype("float32"), verbose=0)
        per_image = keras.losses.sparse_categorical_crossentropy(labels, probs).numpy()
        weights = class_weights(meta, mode) or {0: 1.0, 1: 1.0}
        expected = float(np.mean([weights[int(y)] * v for y, v in zip(labels, per_image)]))
        losses[mode] = float(_history(out)[0]["loss"])
        assert losses[mode] == pytest.approx(expected, rel=1e-4), mode
    assert class_weights(meta, "balanced") == pytest.approx({0: 12 / 18, 1: 12 / 6})
    assert abs(losses["balanced"] - losses["none"]) > 0.01  # the weighting changed what fit minimised


def test_missing_imagenet_weights_stop_training_before_it_starts(
        processed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))
    params = _params(vgg={"architecture": "vgg19", "weights": "imagenet", "trainable": "none", "input_size": 32})
    with pytest.raises(WeightsUnavailable, match="vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"):
        train("vgg", params, processed, tmp_path / "emb", tmp_path / "vgg")
    assert not (tmp_path / "vgg").exists()


def test_mixed_precision_trains_in_float16_and_saves_float32(processed: Path, tmp_path: Path) -> None:
    params = parse_params({"train": {"seed": 3, "mixed_precision": "on"}, "models": {"cnn": CNN | {"epochs": 1}}})
    seen: list[str] = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seen.extend(self.model.get_layer(n).compute_dtype for n in ("block1_conv", "probs"))

    summary = train("cnn", params, processed, tmp_path / "emb", tmp_path / "cnn", callbacks=[Probe()])
    assert summary["mixed_precision"] is True and seen == ["float16", "float32"]
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    model = load_model(tmp_path / "cnn" / "model.keras")
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}  # serving runs in float32


def test_embed_stage_removes_caches_and_records_no_active_model_uses(processed: Path, tmp_path: Path) -> None:
    from medflow import stages
    from medflow.layout import Layout

    layout = Layout(tmp_path)
    layout.processed.parent.mkdir(parents=True)
    layout.processed.symlink_to(processed)
    frozen = CNN | {"trainable": "none"}

    def run(active: list[str], **models: dict) -> dict:
        return stages.embed(parse_params({"train": {"seed": 3}, "models": models, "active_models": active}), layout)

    old = run(["a", "b"], a=frozen, b=CNN)["a"]
    (layout.embeddings / ".x.tmp").mkdir()  # another run's folder in progress
    (layout.embeddings / "notes").mkdir()  # not a cache: never touched
    new = run(["a"], a=frozen | {"input_size": 48}, b=CNN)["a"]
    assert new["key"] != old["key"] and not new["reused"]
    assert sorted(p.name for p in layout.embeddings.iterdir()) == sorted([".x.tmp", "notes", "a.json", new["key"]])
    # a model run on demand (not active) keeps its record and cache
    on_demand = stages.embed(parse_params({"train": {"seed": 3}, "models": {"a": frozen | {"input_size": 48},
                                                                              "c": frozen}, "active_models": ["a"]}),
                             layout, models=["c"])["c"]
    assert (layout.embeddings / "c.json").exists() and (layout.embeddings / on_demand["key"]).is_dir()


def test_embeddings_are_each_splits_features_in_order(processed: Path, tmp_path: Path) -> None:
    """Batches of 5 span the split boundaries (12 + 8 + 4 images) and the last one is padded: each split's
    cached rows are still its own images' features, labels and ids, in shard order."""
    params = _params(frozen=CNN | {"trainable": "none", "batch_size": 5})
    info = embed("frozen", params, processed, tmp_path / "emb", splits=("test", "val", "train"))
    assert info["counts"] == {"train": 12, "val": 8, "test": 4}  # split order fixed, whatever the request
    with pytest.raises(ValueError, match="splits must be among"):
        embed("frozen", params, processed, tmp_path / "emb", splits=("train", "holdout"))
    keras.utils.set_random_seed(3)  # the seeded random backbone embed() built
    model = build_model(params.model("frozen"), 2, 32, 3, weights=None)
    extractor = keras.Model(model.input, model.get_layer("embedding").output)
    for split in ("train", "val", "test"):
        images, labels, ids = shards.load_arrays(processed, split)
        x, y, cached_ids = load_embeddings(info["dir"], split)
        np.testing.assert_allclose(x, extractor.predict(images.astype("float32"), verbose=0), rtol=1e-5, atol=1e-5)
        assert list(y) == list(labels) and cached_ids == ids


def test_no_variable_is_created_once_training_starts() -> None:
    """Optimizer and metric variables exist before fit(): created inside the first traced step, they make
    tf.function trace that step twice."""
    net = build_head(ModelConfig(architecture="basic_cnn", dropout=0.2), 2, 8)
    net.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"], steps_per_execution=2)
    _create_training_state(net, 2)
    created: list[str] = []

    def record(next_creator, **kwargs):  # noqa: ANN001, ANN003, ANN202 - tf.variable_creator_scope's protocol
        created.append(kwargs.get("name"))
        return next_creator(**kwargs)

    with tf.variable_creator_scope(record):
        net.fit(np.ones((8, 8), "float32"), np.arange(8) % 2, batch_size=4, validation_split=0.5, verbose=0)
    assert created == [] and float(net.optimizer.iterations) == 1


def test_gc_frozen_restores_the_collector_and_nests() -> None:
    """Frozen objects can still be freed (the count may drop between calls), so the nested block is checked
    by what it would change: freezing again would add the objects made since, unfreezing would empty it."""
    assert gc.get_freeze_count() == 0
    with gc_frozen():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        fresh = [[] for _ in range(1000)]  # made after the freeze
        with gc_frozen():  # an enclosing freeze: left alone
            assert gc.get_freeze_count() < frozen + len(fresh)
        assert 0 < gc.get_freeze_count() <= frozen
    assert gc.get_freeze_count() == 0


def test_embedding_cache_is_recomputed_for_other_data(processed: Path, tmp_path: Path) -> None:
    params = _params(frozen_cnn=CNN | {"trainable": "none"})  # a random (seeded) frozen backbone: cheap
    emb = tmp_path / "emb"
    first = embed("frozen_cnn", params, processed, emb)
    assert first["reused"] is False and embed("frozen_cnn", params, processed, emb)["reused"] is True
    before = load_embeddings(first["dir"], "val")[0]
    other = make_processed(tmp_path / "other", {"train": 12, "val": 8, "test": 4}, seed=1)  # same shapes
    again = embed("frozen_cnn", params, other, emb)
    assert again["key"] == first["key"] and again["reused"] is False  # same backbone, other images
    assert not np.allclose(load_embeddings(again["dir"], "val")[0], before)


def test_cached_head_resumes_after_kill_with_optimizer_state(processed: Path, tmp_path: Path) -> None:
    params = _params(frozen=CNN | {"trainable": "none", "epochs": 3, "augment": {"flip": False}})  # random, seeded
    out, emb = tmp_path / "frozen", tmp_path / "emb"
    with pytest.raises(SimulatedKill):
        train("frozen", params, processed, emb, out, callbacks=[_Kill(at=1)])
    assert (out / "backup").is_dir() and (out / "checkpoints" / "best.weights.npz").exists()

    class Restored(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict | None = None) -> None:  # runs after the backup was restored
            self.iterations = int(self.model.optimizer.iterations)

    probe, second = Restored(), _Kill(at=None)
    summary = train("frozen", params, processed, emb, out, callbacks=[probe, second])
    assert second.seen == [2] and summary["resumed_from_epoch"] == 2 and summary["epochs_run"] == 3
    assert probe.iterations == 2 * 3  # 2 epochs of ceil(12 / 4) steps: the optimizer state came back too
    assert [int(r["epoch"]) for r in _history(out)] == [1, 2, 3] and not (out / "backup").exists()

    model = load_model(out / "model.keras")  # the full model's backbone is the one the cache was computed with
    images = shards.load_arrays(processed, "val")[0].astype("float32")
    embedded = keras.Model(model.input, model.get_layer("embedding").output).predict(images, verbose=0)
    cached = load_embeddings(emb / summary["embedding_cache"], "val")[0]
    np.testing.assert_allclose(embedded, cached, rtol=1e-4, atol=1e-4)


def test_same_seed_same_model(processed: Path, tmp_path: Path) -> None:
    """Fixed seeds make a run repeatable: augmented from-scratch training twice gives identical weights."""
    params = _params(cnn=CNN | {"epochs": 3})
    runs = [train("cnn", params, processed, tmp_path / "emb", tmp_path / f"run{i}") for i in range(2)]
    assert runs[0]["best"] == runs[1]["best"] and runs[0]["epochs_run"] == 3
    a, b = (load_model(tmp_path / f"run{i}" / "model.keras").get_weights() for i in range(2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


class _StepWeights(keras.callbacks.Callback):
    """The raw trainable weights after every training step, grouped by epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[list[list[np.ndarray]]] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epochs.append([])

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.epochs[-1].append([keras.ops.convert_to_numpy(w) for w in self.model.trainable_weights])


def _ema_by_epoch(steps: _StepWeights, momentum: float) -> list[list[np.ndarray]]:
    """Exponential moving average of the recorded weights at each epoch's end (first step: the weights)."""
    average, out = None, []
    for epoch in steps.epochs:
        for weights in epoch:
            average = weights if average is None else [momentum * a + (1 - momentum) * w
                                                       for a, w in zip(average, weights, strict=True)]
        out.append(average)
    return out


@pytest.mark.parametrize(("keep", "mixed"), [("best", "off"), ("last", "off"), ("last", "on")])
def test_weight_average_is_validated_checkpointed_and_saved(processed: Path, tmp_path: Path, keep: str,
                                                            mixed: str) -> None:
    """With ``ema``, validation scores the averaged weights and the saved model holds the average of the
    epoch kept (``keep``: best val_loss or last), not the raw weights; under mixed precision too."""
    momentum = 0.8
    params = _params(cnn=CNN | {"epochs": 4, "ema": momentum, "keep": keep, "augment": {"flip": False}})
    params = params.model_copy(update={"train": params.train.model_copy(update={"mixed_precision": mixed})})
    steps = _StepWeights()
    summary = train("cnn", params, processed, tmp_path / "emb", tmp_path / "run", callbacks=[steps])
    rows = _history(tmp_path / "run")
    kept = summary["best_epoch"] if keep == "best" else 4
    assert summary["kept"] == keep and summary["kept_epoch"] == kept and summary["ema"] == momentum
    assert summary["mixed_precision"] is (mixed == "on")

    model = load_model(tmp_path / "run" / "model.keras")
    expected = _ema_by_epoch(steps, momentum)[kept - 1]
    raw = steps.epochs[kept - 1][-1]
    for saved, average, last in zip(model.trainable_weights, expected, raw, strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(saved), average, rtol=1e-4, atol=1e-6)
    assert not all(np.allclose(a, r, atol=1e-6) for a, r in zip(expected, raw, strict=True))  # averaging mattered

    # the val_loss logged for the kept epoch is the saved (averaged) model's loss on the val split
    x, y, _ = shards.load_arrays(processed, "val")
    proba = model.predict(x.astype("float32"), verbose=0)
    loss = float(keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, proba)))
    assert float(rows[kept - 1]["val_loss"]) == pytest.approx(loss, rel=1e-4 if mixed == "off" else 1e-2)


class _Averages(keras.callbacks.Callback):
    """The averaged trainable weights (``averaged_weights``) at train begin and at every epoch end."""

    def __init__(self) -> None:
        super().__init__()
        self.at_begin: list[np.ndarray] = []
        self.at_end: list[list[np.ndarray]] = []

    def _now(self) -> list[np.ndarray]:
        return [keras.ops.convert_to_numpy(w) for w in averaged_weights(self.model)]

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.at_begin = self._now()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.at_end.append(self._now())


def test_weight_average_resumes_after_kill(processed: Path, tmp_path: Path) -> None:
    """The backup carries the moving average: a resumed run continues from the average it had reached."""
    params = _params(cnn=CNN | {"epochs": 3, "ema": 0.8, "keep": "last"})
    out = tmp_path / "run"
    first = _Averages()
    with pytest.raises(SimulatedKill):
        train("cnn", params, processed, tmp_path / "emb", out, callbacks=[first, _Kill(at=0)])
    second = _Averages()
    summary = train("cnn", params, processed, tmp_path / "emb", out, callbacks=[second])
    assert summary["resumed_from_epoch"] == 1 and summary["epochs_run"] == 3 and summary["kept_epoch"] == 3
    for resumed, killed in zip(second.at_begin, first.at_end[0], strict=True):
        np.testing.assert_array_equal(resumed, killed)
    saved = load_model(out / "model.keras").weights
    for w, a in zip(saved, second.at_end[-1], strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(w), a, rtol=1e-6)
