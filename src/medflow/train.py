"""Train one registry model: streamed tf.data input, class weights, early stopping, LR schedule,
per-epoch backup with resume after a kill, DVCLive metrics; frozen backbones train their head on
the embedding cache and are then assembled into the full model.

Outputs in ``out_dir``: ``model.keras`` (full model, float32, uncompiled), ``history.csv``,
``train_summary.json``, ``checkpoints/best.weights.npz``, ``backup/`` (only while unfinished), ``dvclive/``.
Checkpoints are plain ``.npz`` arrays written atomically (temp file + ``os.replace``): a head on cached
embeddings trains in milliseconds an epoch, where Keras' ``.h5`` writers cost ~10 ms each.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medflow.config import ModelConfig, Params
from medflow.data import shards
from medflow.io import atomic_write_json
from medflow.runtime import gc_frozen

if TYPE_CHECKING:
    import dvclive
    import keras
    import tensorflow as tf

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr"]
BACKUP_STATE = "state.npz"  # in backup/: weights, optimizer variables, callback counters, the last finished epoch
COUNTER_STATE = ("wait", "best", "cooldown_counter")  # EarlyStopping / ReduceLROnPlateau state a resume restores


def class_weights(meta: dict, mode: str) -> dict[int, float] | None:
    """'balanced' inverse-frequency weights n / (k * n_c) from the train class counts; None for 'none'."""
    if mode == "none":
        return None
    counts = [int(meta["class_counts"]["train"].get(c, 0)) for c in meta["classes"]]
    total, k = sum(counts), len(counts)
    return {i: (total / (k * n) if n else 1.0) for i, n in enumerate(counts)}


def datasets(cfg: ModelConfig, processed_dir: str | Path, seed: int) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """(train, val) pipelines: train shuffled, read as uint8 and augmented (Keras layer, training=True) to
    float32; val untouched.

    Both declare their batch count (from meta.json), which Keras uses for progress and epoch ends.
    """
    import tensorflow as tf

    from medflow.models.augment import augment_dataset

    counts = shards.read_meta(processed_dir)["counts"]

    def sized(split: str, **kw: Any) -> tf.data.Dataset:
        ds = shards.dataset(processed_dir, split, batch_size=cfg.batch_size, **kw)
        return ds.apply(tf.data.experimental.assert_cardinality(-(-int(counts.get(split, 0)) // cfg.batch_size)))

    return augment_dataset(sized("train", shuffle=True, seed=seed, dtype="uint8"), cfg.augment, seed), sized("val")


def embedding_datasets(cache_dir: str | Path, batch_size: int, seed: int) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """(train, val) batches of cached ``(embedding, label)`` pairs (small: N×D floats).

    train is reshuffled every epoch and repeats forever, so one iterator serves every epoch (fit it with
    ``steps_per_epoch``): a new iterator per epoch costs more than the epoch itself.
    """
    import tensorflow as tf

    from medflow.embed import load_embeddings

    x, y, _ = load_embeddings(cache_dir, "train")
    train_ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    val_ds = tf.data.Dataset.from_tensor_slices(load_embeddings(cache_dir, "val")[:2])
    return train_ds.batch(batch_size).repeat(), val_ds.batch(batch_size)


def use_mixed_precision(mode: str) -> bool:
    """'on', 'off', or 'auto' (on only when a GPU is visible)."""
    import tensorflow as tf

    return mode == "on" or (mode == "auto" and bool(tf.config.list_physical_devices("GPU")))


def _strategy() -> tf.distribute.Strategy:
    """MirroredStrategy over all visible GPUs when there are several, else the default strategy."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def _optimizer(cfg: ModelConfig) -> keras.optimizers.Optimizer:
    import keras

    return {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD,
            "rmsprop": keras.optimizers.RMSprop}[cfg.optimizer](
        learning_rate=cfg.learning_rate, use_ema=cfg.ema is not None, ema_momentum=cfg.ema or 0.99)


def averaged_weights(model: keras.Model) -> list[keras.Variable]:
    """``model.weights`` with each trainable weight replaced by the optimizer's moving average of it
    (``ModelConfig.ema``); the weights themselves when the optimizer keeps no average."""
    opt = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # mixed precision wraps it
    if not getattr(opt, "use_ema", False) or not opt.built:
        return list(model.weights)
    average = {id(v): a for v, a in zip(opt._trainable_variables, opt._model_variables_moving_average, strict=True)
               if a is not None}
    return [average.get(id(w), w) for w in model.weights]


def _create_training_state(net: keras.Model, num_classes: int) -> None:
    """Create the optimizer's and the compiled metrics' variables now (metric values reset after).

    Without a distribution strategy, Keras creates them inside the first traced train step, and tf.function
    then traces that step a second time, without variable creation (tensorflow#48851): ~0.3 s for a head on
    embeddings, more through a backbone. Under a strategy (call this in its scope) Keras builds them first.
    """
    import tensorflow as tf

    if tf.distribute.has_strategy():
        return
    net.optimizer.build(net.trainable_variables)
    net.compute_metrics(None, np.zeros(1, np.int32), np.zeros((1, num_classes), np.float32))
    net.reset_metrics()


def _save_arrays(path: Path, variables: Sequence[keras.Variable], **extra: Any) -> None:
    """Write the variables' values (``arr_0``, ``arr_1`` ...) and ``extra`` arrays to ``path`` atomically."""
    import keras

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, *[keras.ops.convert_to_numpy(v) for v in variables], **extra)
    os.replace(tmp, path)


def _load_arrays(path: Path, variables: Sequence[keras.Variable]) -> dict[str, np.ndarray]:
    """Assign the values saved by :func:`_save_arrays` to ``variables``; returns the extra arrays."""
    with np.load(path) as z:
        values = {k: z[k] for k in z.files}
    saved = [values.pop(f"arr_{i}") for i in range(sum(k.startswith("arr_") for k in values))]
    if [a.shape for a in saved] != [tuple(v.shape) for v in variables]:
        raise ValueError(f"{path} does not hold this model's variables")
    for v, a in zip(variables, saved, strict=True):
        v.assign(a)
    return values


def _checkpoint_callbacks(best_path: Path, backup_dir: Path, monitor: str, best: float | None,
                          counters: Sequence[keras.callbacks.Callback],
                          ) -> tuple[keras.callbacks.Callback, keras.callbacks.Callback]:
    """(best weights, per-epoch backup): the roles of Keras' ModelCheckpoint(save_best_only, weights only)
    and BackupAndRestore, each state one ``.npz`` written atomically. The best weights are the averaged
    ones when the optimizer keeps an average (what validation measured); the backup holds the raw weights,
    the optimizer's variables (averages included) and the ``counters`` callbacks' patience state
    (EarlyStopping, ReduceLROnPlateau: :data:`COUNTER_STATE`), so a resumed run stops and lowers the
    learning rate when the uninterrupted one would. The backup must come after ``counters`` in the
    callback list: it restores their state after they reset it at the start of ``fit``."""
    import keras

    class BestWeights(keras.callbacks.Callback):
        """Saves the model weights whenever ``monitor`` reaches a new minimum (``best``: of a resumed run)."""

        def __init__(self) -> None:
            super().__init__()
            self.best = float("inf") if best is None else best

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            value = (logs or {}).get(monitor)
            if value is not None and float(value) < self.best:
                self.best = float(value)
                _save_arrays(best_path, averaged_weights(self.model))

    class Backup(keras.callbacks.BackupAndRestore):
        """Keras' BackupAndRestore (resume at the epoch after the last one finished; deleted when training
        ends) storing weights, optimizer variables (learning rate included) and the epoch in one file."""

        def _state(self) -> list[keras.Variable]:
            if not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)
            return [*self.model.weights, *self.model.optimizer.variables]

        def _load_model(self) -> None:
            if (backup_dir / BACKUP_STATE).exists():
                extra = _load_arrays(backup_dir / BACKUP_STATE, self._state())
                self.model._initial_epoch = int(extra["epoch"])  # how BackupAndRestore tells fit() to resume
                for i, cb in enumerate(counters):
                    for name in COUNTER_STATE:
                        if (key := f"cb{i}_{name}") in extra:
                            value = float(extra[key])
                            setattr(cb, name, None if np.isnan(value) else value if name == "best" else int(value))

        def _save_model(self) -> None:
            backup_dir.mkdir(parents=True, exist_ok=True)
            state = {f"cb{i}_{name}": np.float64(np.nan if getattr(cb, name) is None else getattr(cb, name))
                     for i, cb in enumerate(counters) for name in COUNTER_STATE if hasattr(cb, name)}
            _save_arrays(backup_dir / BACKUP_STATE, self._state(), epoch=np.int64(self._current_epoch), **state)

    return BestWeights(), Backup(str(backup_dir))


def _history_callback(path: Path, rows: dict[int, dict]) -> keras.callbacks.Callback:
    import keras

    class HistoryCSV(keras.callbacks.Callback):
        """Rewrites ``history.csv`` after every epoch (rows keyed by epoch, so a resumed run continues it)."""

        def __init__(self) -> None:
            super().__init__()
            self.ran: list[int] = []

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            lr = logs.get("learning_rate", float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
            rows[epoch + 1] = {"epoch": epoch + 1, **{k: logs.get(k, "") for k in HISTORY_COLUMNS[1:5]}, "lr": lr}
            self.ran.append(epoch + 1)
            tmp = path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, HISTORY_COLUMNS)
                w.writeheader()
                w.writerows(rows[e] for e in sorted(rows))
            os.replace(tmp, path)

    return HistoryCSV()


def _read_history(path: Path) -> dict[int, dict]:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {int(r["epoch"]): r for r in csv.DictReader(f)}


def _run_id(cfg: ModelConfig, params: Params, data: str, mixed: bool) -> str:
    """What a backup belongs to: a backup of another config, data or precision (``mixed_precision: auto``
    resolves per machine; its loss scaling adds optimizer variables) is discarded, not resumed."""
    blob = json.dumps([cfg.model_dump(mode="json"), params.train.model_dump(mode="json"), data, mixed],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _prepare_out_dir(out_dir: Path, run_id: str) -> bool:
    """Create ``out_dir``; keep a resumable backup of the same run (True), else clear old training state."""
    backup, run_file = out_dir / "backup", out_dir / "checkpoints" / "run.json"
    resuming = (backup / BACKUP_STATE).is_file() and run_file.exists() and \
        json.loads(run_file.read_text()).get("run_id") == run_id
    if not resuming:
        for name in ("backup", "checkpoints", "dvclive"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
        (out_dir / "history.csv").unlink(missing_ok=True)
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"run_id": run_id}) + "\n")
    return resuming


def _live(path: Path, resume: bool) -> dvclive.Live:
    """DVCLive's ``Live`` for ``path``, without the Studio payload it gathers at every step even when no
    Studio is configured (params.yaml and every metrics file re-read: ~1-5 ms an epoch)."""
    from dvclive import Live

    class StudioOnlyWhenOn(Live):
        def post_data_to_studio(self) -> None:
            if "data" not in getattr(self, "_studio_events_to_skip", ()):  # what post_to_studio() checks
                super().post_data_to_studio()

    try:
        return StudioOnlyWhenOn(str(path), resume=resume, save_dvc_exp=False, dvcyaml=None)
    except Exception as e:  # scmrepo.SCMError on a git repository without commits
        raise RuntimeError(f"DVCLive cannot log this run: {e}. Commit once (`git add -A && git commit`) "
                           "or run outside a git repository.") from e


def _fit(net: keras.Model, train_ds: Any, val_ds: Any, cfg: ModelConfig, params: Params, out_dir: Path,
         weights: dict[int, float] | None, has_val: bool, resuming: bool,
         extra: Sequence[keras.callbacks.Callback], steps_per_epoch: int | None = None) -> dict:
    import keras
    from dvclive.keras import DVCLiveCallback

    monitor = "val_loss" if has_val else "loss"
    history_path = out_dir / "history.csv"
    rows = _read_history(history_path) if resuming else {}
    previous = [float(r[monitor]) for r in rows.values() if r.get(monitor) not in (None, "")]
    best_path = out_dir / "checkpoints" / "best.weights.npz"
    stopper = keras.callbacks.EarlyStopping(monitor=monitor, patience=params.train.patience)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=0.2, patience=params.train.lr_patience,
                                                min_lr=1e-7, verbose=1)
    best_weights, backup = _checkpoint_callbacks(best_path, out_dir / "backup", monitor, min(previous, default=None),
                                                 counters=[plateau, stopper])
    history = _history_callback(history_path, rows)
    live = _live(out_dir / "dvclive", resuming)
    live.log_params({"model": cfg.model_dump(mode="json"), "train": params.train.model_dump(mode="json")})
    callbacks = [
        *([keras.callbacks.SwapEMAWeights()] if cfg.ema is not None else []),  # validate the averaged weights
        plateau,
        stopper,
        best_weights,
        history,
        DVCLiveCallback(live=live),
        backup,  # last: saves the lr just reduced
        *extra,
    ]
    start = time.perf_counter()
    net.fit(train_ds, validation_data=val_ds if has_val else None, epochs=cfg.epochs, class_weight=weights,
            steps_per_epoch=steps_per_epoch, callbacks=callbacks, shuffle=False, verbose=2)  # datasets shuffle
    seconds = time.perf_counter() - start  # fit() ends with the averaged weights in place (ema)
    scored = [r for r in rows.values() if r.get(monitor) not in (None, "")]
    best = min(scored, key=lambda r: float(r[monitor])) if scored else {}
    keep_best = cfg.keep == "best" and best_path.exists() and bool(best)
    if keep_best:
        _load_arrays(best_path, net.weights)
    return {"seconds": seconds, "ran": history.ran, "epochs": max(rows, default=0),
            "stopped_early": stopper.stopped_epoch > 0, "monitor": monitor,
            "best_epoch": int(best["epoch"]) if best else None,
            "kept_epoch": int(best["epoch"]) if keep_best else max(rows, default=None),
            "best": {k: float(best[k]) for k in HISTORY_COLUMNS[1:5] if best and best.get(k) not in (None, "")}}


@gc_frozen()
def train(model_name: str, params: Params, processed_dir: str | Path, embeddings_dir: str | Path,
          out_dir: str | Path, *, callbacks: Sequence[keras.callbacks.Callback] = ()) -> dict:
    """Fit ``model_name`` on the train split (val for early stopping / LR / best weights) and save it.

    Resumes from ``out_dir/backup`` when a previous run of the same config and data was killed.
    ``callbacks`` are extra Keras callbacks, run after the built-in ones.
    """
    import keras
    import tensorflow as tf

    from medflow.embed import data_fingerprint, embed, uses_embedding_cache
    from medflow.models.registry import (
        build_head,
        build_model,
        input_size,
        transfer_head,
    )
    from medflow.models.weights import resolve_weights, weights_fingerprint

    cfg = params.model(model_name)
    meta = shards.read_meta(processed_dir)
    k, size, channels = len(meta["classes"]), meta["image_size"], meta["channels"]
    out_dir = Path(out_dir)
    weights = resolve_weights(cfg, input_size(cfg, size))  # fails before any work if weights are missing
    mixed = use_mixed_precision(params.train.mixed_precision)
    resuming = _prepare_out_dir(out_dir, _run_id(cfg, params, data_fingerprint(processed_dir), mixed))
    keras.utils.set_random_seed(params.train.seed)
    strategy = _strategy()
    cached = uses_embedding_cache(cfg)
    has_val = int(meta["counts"].get("val", 0)) > 0
    n_train = int(meta["counts"].get("train", 0))
    policy = keras.config.dtype_policy()
    embed_info: dict = {}
    try:
        if mixed:
            keras.config.set_dtype_policy("mixed_float16")
        if cached:
            if any(cfg.augment.model_dump().values()):
                warnings.warn(f"{model_name}: augmentation is not applied when the head trains on cached "
                              "embeddings (set use_embedding_cache: false to augment)", stacklevel=2)
            embed_info = embed(model_name, params, processed_dir, embeddings_dir)
            train_ds, val_ds = embedding_datasets(embed_info["dir"], cfg.batch_size, params.train.seed)
            keras.utils.set_random_seed(params.train.seed)  # the same head whether embed() just built a backbone
            with strategy.scope():
                net = build_head(cfg, k, embed_info["dim"])
        else:
            train_ds, val_ds = datasets(cfg, processed_dir, params.train.seed)
            with strategy.scope():
                net = build_model(cfg, k, size, channels, weights=weights)
        # a head's step takes ~1 ms: one call runs a whole epoch, on an iterator kept across epochs
        steps = -(-n_train // cfg.batch_size) if cached else None
        # several steps per call fail under MirroredStrategy with more than one replica (keras#19246)
        per_call = steps if steps and strategy.num_replicas_in_sync == 1 else 1
        with strategy.scope():
            net.compile(optimizer=_optimizer(cfg), loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                        steps_per_execution=per_call)
            _create_training_state(net, k)
        fit = _fit(net, train_ds.prefetch(shards.PREFETCH_BATCHES), val_ds, cfg, params, out_dir,
                   class_weights(meta, cfg.class_weight), has_val, resuming, callbacks, steps_per_epoch=steps)
    finally:
        keras.config.set_dtype_policy(policy)

    if cached:  # a random (weights: null) frozen backbone must be the one embed() built, seeded alike
        keras.utils.set_random_seed(params.train.seed)
    model = build_model(cfg, k, size, channels, weights=weights)  # float32, uncompiled: for evaluate/serve
    if cached:
        transfer_head(net, model)
    else:
        model.set_weights(net.get_weights())
    tmp = out_dir / ".model.tmp.keras"
    model.save(tmp)
    os.replace(tmp, out_dir / "model.keras")

    summary = {
        "model": model_name, "architecture": cfg.architecture, "classes": meta["classes"],
        "input_size": input_size(cfg, size),
        "weights": cfg.weights or "none (random initialisation)", "weights_fingerprint": weights_fingerprint(weights),
        "embedding_cache": embed_info.get("key"), "epochs_planned": cfg.epochs, "epochs_run": fit["epochs"],
        "epochs_this_run": len(fit["ran"]), "resumed_from_epoch": (fit["ran"][0] - 1) if resuming and fit["ran"]
        else None, "stopped_early": fit["stopped_early"], "monitor": fit["monitor"], "best_epoch": fit["best_epoch"],
        "kept": cfg.keep, "kept_epoch": fit["kept_epoch"], "ema": cfg.ema,
        "best": fit["best"], "seconds": round(fit["seconds"], 2),
        "images_per_second": round(n_train * len(fit["ran"]) / max(fit["seconds"], 1e-9), 1),
        "params": {"total": int(model.count_params()),
                   "trainable": int(sum(keras.ops.size(w) for w in net.trainable_weights))},
        "batch_size": cfg.batch_size, "mixed_precision": mixed, "replicas": strategy.num_replicas_in_sync,
    }
    atomic_write_json(out_dir / "train_summary.json", summary)
    kept = f"epoch {fit['kept_epoch']}'s {'averaged ' if cfg.ema is not None else ''}weights"
    print(f"train {model_name}: {summary['epochs_run']} epochs, best {fit['monitor']} "
          f"{fit['best'].get(fit['monitor'])} at epoch {fit['best_epoch']}; {kept} -> {out_dir / 'model.keras'}",
          file=sys.stderr)
    return summary
