"""The pipeline's stages: one function each, shared by `dvc repro` (via the CLI) and the Prefect flows.

Each stage reads its inputs from the project layout (``medflow.layout.Layout``), takes its config
section from ``Params`` and returns a small JSON-able summary. The work itself lives in the
step packages (``medflow.data``, ``medflow.train``, ``medflow.evaluate`` ...); this module only
wires layout paths to them, so there is exactly one definition of the pipeline.
"""

from __future__ import annotations

import sys
from pathlib import Path

from medflow.config import Params
from medflow.layout import Layout


def ingest(params: Params, layout: Layout = Layout(), source: str | Path | None = None,
           out: str | Path | None = None) -> dict:
    """Source (folder | CSV | npz | DICOM) -> manifest, quarantine, pixels, summary in ``out`` (default
    ``data/interim``). Without ``source``: ``data.source`` (as ``data.format``) plus ``data.extra_sources``; an
    explicit ``source`` (e.g. a batch) is read alone, its kind detected. Raises SourceError, after writing the
    quarantine table, when no image is usable."""
    from medflow.data.ingest import ingest as run
    from medflow.data.sources import SourceError

    out = layout.interim if out is None else Path(out)
    if source is not None:
        summary = run(Path(source), out, params.data.model_copy(update={"format": "auto"}), params.ingest)
    else:
        summary = run(layout.root / params.data.source, out, params.data, params.ingest,
                      extra_sources=params.data.extra_sources, extra_root=layout.root)
    if not summary["accepted"]:
        hint = ("; images must sit in class folders: SOURCE/<class>/<image> (or SOURCE/<split>/<class>/<image>)"
                if set(summary["by_reason"]) == {"no_label"} else "")
        raise SourceError(f"{summary['source']}: no usable image ({summary['reconciliation']}){hint}; each file and "
                          f"its reason are in {out / 'quarantine.csv'}")
    return summary


def validate(params: Params, layout: Layout = Layout()) -> dict:
    """Great Expectations gate on the manifest; raises ValidationFailed. First, ``evaluate.positive_class`` must
    be one of the ingested classes (ConfigError): found here, not after training."""
    import json

    from medflow.data.validate import validate as run
    from medflow.evaluate import positive_index

    positive_index(json.loads(layout.ingest_summary.read_text())["classes"], params.evaluate.positive_class)

    return run(layout.manifest, layout.quarantine, layout.ingest_summary, layout.validation_dir,
               params.validate_, params.data)


def split(params: Params, layout: Layout = Layout()) -> dict:
    """Stratified, grouped, duplicate-safe train/val/test assignment."""
    from medflow.data.split import run_split

    return run_split(layout.manifest, layout.splits, layout.split_counts, params.split)


def preprocess(params: Params, layout: Layout = Layout()) -> dict:
    """Pack the resized pixels of each split into streamable fixed-length-record shards."""
    from medflow.data.shards import write_shards

    return write_shards(layout.manifest, layout.pixels, layout.splits, layout.processed,
                        shard_size=params.preprocess.shard_size,
                        workers=params.preprocess.workers, data=params.data)


def embed(params: Params, layout: Layout = Layout(), models: list[str] | None = None) -> dict:
    """Cache frozen-backbone embeddings for the given (default: active) models, then remove the caches and
    records that no active model uses any more (an old backbone, size or data would otherwise stay for good)."""
    from medflow.embed import embed as run
    from medflow.embed import prune

    out = {}
    layout.embeddings.mkdir(parents=True, exist_ok=True)  # the DVC output exists even with no frozen model
    for name in models if models is not None else params.active_models:
        out[name] = run(name, params, layout.processed, layout.embeddings)
    if removed := prune(layout.embeddings, [*params.active_models, *(models or [])]):
        print(f"embed: removed what no active model uses: {', '.join(removed)}", file=sys.stderr)
    return out


def train(params: Params, model: str, layout: Layout = Layout()) -> dict:
    """Fit one registry model on the train split (val for early stopping)."""
    from medflow.train import train as run

    params.model(model)  # clear error for unknown names
    return run(model, params, layout.processed, layout.embeddings, layout.model_dir(model))


def evaluate(params: Params, model: str, layout: Layout = Layout()) -> dict:
    """Test-split metrics, predictions, plots data for one trained model."""
    from medflow.evaluate import evaluate as run

    params.model(model)
    return run(model, params, layout.processed, layout.model_dir(model), layout.metrics(model),
               layout.eval_dir(model))


def compare(params: Params, layout: Layout = Layout(), models: list[str] | None = None) -> dict:
    """Comparison table across evaluated models; records the champion (with the train images' input profile)."""
    from medflow.data.shards import read_meta
    from medflow.evaluate import compare as run
    from medflow.evaluate import dir_hash, params_hash

    names = models if models is not None else params.active_models
    return run({m: layout.metrics(m) for m in names}, layout.comparison, layout.champion,
               metric=params.evaluate.champion_metric, data_hash=dir_hash(layout.processed),
               params_hash=params_hash(params), meta=read_meta(layout.processed), root=layout.root,
               bootstrap=params.evaluate.bootstrap, bins=params.evaluate.calibration_bins, seed=params.train.seed,
               manifest=layout.manifest, splits=layout.splits)


def report(params: Params, layout: Layout = Layout()) -> dict:
    """Self-contained HTML report (reports/index.html)."""
    from medflow.report.build import build_report

    path = build_report(layout, params)
    return {"report": str(path)}


def monitor(params: Params, batch: str | Path, layout: Layout = Layout(), name: str | None = None,
            champion: str | Path | None = None) -> dict:
    """Ingest a new batch, predict with the champion, Evidently drift/performance report; verdict ok|drift|degraded."""
    from medflow.config import ConfigError
    from medflow.data.shards import read_meta
    from medflow.monitor.features import ReferenceData
    from medflow.monitor.run import monitor_batch
    from medflow.serve.predictor import load_champion

    record, _ = load_champion(champion_json := Path(champion) if champion else layout.deployed_champion)
    if layout.processed.exists() and list(record["classes"]) != (classes := read_meta(layout.processed)["classes"]):
        raise ConfigError(f"{champion_json}: model {record.get('version')} knows the classes {record['classes']}, "
                          f"but the pipeline's data (the drift reference) has {classes}: deploy a model trained on "
                          "this data (`medflow promote`; `medflow promote --force` when the test set changed) or "
                          "rerun the pipeline on the model's data")
    return monitor_batch(batch, champion_json=champion_json,
                         reference=ReferenceData(layout.manifest, layout.pixels, layout.splits),
                         out_root=layout.monitoring, params=params, name=name)
