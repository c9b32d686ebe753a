"""Per-epoch val and test accuracy of a MedMNIST recipe, raw weights and their moving average (a diagnosis).

    .venv/bin/python benchmarks/epoch_curves.py [--dataset pneumoniamnist] [--recipe cnn] [--seeds 3] [--ema 0.99]

Trains ``benchmarks/accuracy.py``'s ``--recipe`` through medflow's ``train()`` for all its epochs (patience
past the last one), once per seed, and after every epoch scores the val and official test splits with the
raw weights and with an exponential moving average of them (momentum ``--ema`` per step, kept here in numpy:
training itself is untouched). It shows how far the epoch that val_loss would pick lands from the rest on
test. The test split chooses nothing: the figures only diagnose the val-based checkpoint choice. It led to
the ``cnnema`` recipe (see benchmarks/RESULTS.md, "Tried").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # the recipes and data preparation of the accuracy benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=["bloodmnist", "pneumoniamnist"], default="pneumoniamnist")
    ap.add_argument("--recipe", choices=sorted(accuracy.RECIPES), default="cnn")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ema", type=float, default=0.99, help="momentum per step of the weights' moving average")
    ap.add_argument("--work", type=Path, default=Path("/tmp/medflow-accuracy/full"))
    args = ap.parse_args()
    sys.path.insert(0, str(accuracy.ROOT / "src"))
    import keras

    from medflow.data import shards
    from medflow.train import train

    setup = accuracy.medmnist_setup(args.dataset, args.recipe, args.work / args.dataset, prefix="curves-")
    if setup is None:
        print(f"skipped: {accuracy.MEDMNIST / f'{args.dataset}.npz'} not found (../shared is not beside this checkout)")
        return
    raw, layout, _, model, fields = setup
    raw["train"]["patience"] = fields["epochs"] + 1  # every epoch runs
    splits = {s: shards.load_arrays(layout.processed, s)[:2] for s in ("val", "test")}

    class Curves(keras.callbacks.Callback):
        """Keeps the moving average of the trainable weights step by step; scores both after each epoch."""

        def __init__(self) -> None:
            super().__init__()
            self.average: list[np.ndarray] | None = None
            self.rows: list[dict] = []

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            weights = [keras.ops.convert_to_numpy(w) for w in self.model.trainable_weights]
            self.average = weights if self.average is None else [
                args.ema * a + (1 - args.ema) * w for a, w in zip(self.average, weights, strict=True)]

        def _scores(self) -> dict[str, float]:
            return {s: float((self.model.predict(x.astype("float32"), batch_size=512, verbose=0).argmax(1) == y).mean())
                    for s, (x, y) in splits.items()}

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            raw_scores = self._scores()
            current = [keras.ops.convert_to_numpy(w) for w in self.model.trainable_weights]
            for w, a in zip(self.model.trainable_weights, self.average, strict=True):
                w.assign(a)
            averaged = self._scores()
            for w, c in zip(self.model.trainable_weights, current, strict=True):
                w.assign(c)
            self.rows.append({"epoch": epoch + 1, "val_loss": float((logs or {}).get("val_loss", np.nan)),
                              **{f"{s}_raw": v for s, v in raw_scores.items()},
                              **{f"{s}_avg": v for s, v in averaged.items()}})

    print(f"# {args.dataset}, recipe {args.recipe} for all {fields['epochs']} epochs, weight average momentum "
          f"{args.ema} per step; accuracy after each epoch")
    summary = []
    for seed in range(args.seeds):
        raw["train"]["seed"] = seed
        curves = Curves()
        train(model, accuracy.make_params(raw), layout.processed, layout.embeddings,
              layout.model_dir(f"{model}-seed{seed}"), callbacks=[curves])
        rows = curves.rows
        print(f"\nseed {seed}\nepoch  val_loss  val raw  val avg  test raw  test avg")
        for r in rows:
            print(f"{r['epoch']:5d}  {r['val_loss']:8.3f}  {r['val_raw']:7.3f}  {r['val_avg']:7.3f}  "
                  f"{r['test_raw']:8.3f}  {r['test_avg']:8.3f}")
        picked = min(rows, key=lambda r: r["val_loss"])
        late = rows[len(rows) // 4:]
        tail = rows[-10:]
        summary.append({"seed": seed, "val_loss_epoch": picked["epoch"], "its_test": picked["test_raw"],
                        "last_raw": rows[-1]["test_raw"], "last_avg": rows[-1]["test_avg"],
                        "avg_last10": (min(r["test_avg"] for r in tail), max(r["test_avg"] for r in tail)),
                        "val_raw_range": (min(r["val_raw"] for r in late), max(r["val_raw"] for r in late))})
    print("\nseed  val_loss epoch  its test  last raw  last avg  avg test, last 10 epochs  raw val acc range "
          "(after the first quarter)")
    for s in summary:
        print(f"{s['seed']:4d}  {s['val_loss_epoch']:14d}  {s['its_test']:8.3f}  {s['last_raw']:8.3f}  "
              f"{s['last_avg']:8.3f}  {s['avg_last10'][0]:.3f}-{s['avg_last10'][1]:.3f}"
              f"{'':14s}{s['val_raw_range'][0]:.2f}-{s['val_raw_range'][1]:.2f}")
    (args.work / f"epoch_curves_{args.dataset}_{args.recipe}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
