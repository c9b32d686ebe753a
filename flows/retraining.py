"""Retraining flow: add new labelled batches to the training data, retrain, promote only a better model.

One run at a time (a file lock here, ``concurrency_limit=1`` on the deployment): a second run is
rejected with :class:`medflow.promote.RetrainBusy`. Each labelled batch is copied to
``data/raw/extra/<batch>/<class>/`` and ``dvc add``-ed (its ``.dvc`` hash is the data version);
ingest reads it through ``data.extra_sources`` as train-only rows, so the test set — and with it the
comparison with the production model — stays fixed. A failed stage fails the flow before the
promotion step, so production is untouched.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (telemetry off, PREFECT_HOME) before prefect is imported
from flows.training import training_flow
from medflow.config import Params, load_params
from medflow.orchestrate import dvc_repo
from medflow.promote import (
    RetrainConfig,
    decide_and_promote,
    dvc_data_version,
    retrain_config,
    retrain_lock,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}


def class_folders(batch: Path) -> dict[str, list[Path]]:
    """``{class: image files}`` for the class sub-folders of a batch (an unlabelled batch has none)."""
    out = {}
    for d in sorted(p for p in batch.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            out[d.name] = files
    return out


def pending_batches(root: Path, cfg: RetrainConfig) -> dict[str, int]:
    """Processed, labelled batches not yet in the training data: ``{batch name: labelled images}``."""
    processed, extra = root / cfg.processed_dir, root / cfg.extra_dir
    if not processed.is_dir():
        return {}
    out = {}
    for b in sorted(p for p in processed.iterdir() if p.is_dir() and not p.name.startswith(".")):
        n = sum(len(v) for v in class_folders(b).values())
        if n and not (extra / b.name).exists():
            out[b.name] = n
    return out


def _warn_if_unused(params: Params, cfg: RetrainConfig, logger: Any) -> None:
    sources = getattr(params.data, "extra_sources", None) or []
    if not any(str(s).rstrip("/").startswith(cfg.extra_dir.rstrip("/")) for s in sources):
        logger.warning("data.extra_sources %s does not include %s/*/: the new data will not reach training",
                       sources, cfg.extra_dir)


@task(cache_policy=NO_CACHE, persist_result=False)
def add_batch(root: str, batch: str) -> dict[str, Any]:
    """Copy one processed batch's class folders to ``<extra_dir>/<batch>/`` and ``dvc add`` it."""
    path = Path(root)
    cfg = retrain_config(load_params(path / "params.yaml"))
    src, dest = path / cfg.processed_dir / batch, path / cfg.extra_dir / batch
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        tmp = dest.parent / f".{batch}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for cls, files in class_folders(src).items():
            (tmp / cls).mkdir(parents=True)
            for f in files:
                shutil.copy2(f, tmp / cls / f.name)
        os.replace(tmp, dest)
    with dvc_repo(path) as repo:
        repo.add(str(dest))
    version = dvc_data_version(dest.with_name(f"{batch}.dvc"))
    get_run_logger().info("batch %s added to the training data (dvc md5 %s)", batch, version)
    return {"batch": batch, "md5": version}


@task(cache_policy=NO_CACHE, persist_result=False)
def promote_if_better(root: str) -> dict[str, Any]:
    """Compare this run's champion with production; swap atomically when the rule allows."""
    cfg = retrain_config(load_params(Path(root) / "params.yaml"))
    result = decide_and_promote(root, cfg)
    get_run_logger().info("promotion decision: %s", result)
    return result


@flow(name="retraining", log_prints=True)
def retraining_flow(root: str = ".", batches: list[str] | None = None) -> dict[str, Any]:
    """Add ``batches`` (default: every pending labelled batch) to the data, retrain, promote if better."""
    logger = get_run_logger()
    path = Path(root).resolve()
    with retrain_lock(path):
        params = load_params(path / "params.yaml")
        cfg = retrain_config(params)
        todo = list(batches) if batches is not None else list(pending_batches(path, cfg))
        if todo:
            _warn_if_unused(params, cfg, logger)
        added = [add_batch(str(path), b) for b in todo]
        stages = training_flow(root=str(path))
        result = promote_if_better(str(path))
    d = result["decision"]
    create_markdown_artifact(
        f"## Promotion decision: {'PROMOTED' if d['promote'] else 'kept production'}\n\n"
        f"- challenger: `{result['candidate']}`\n- production now: `{result['production']}`\n"
        f"- {d['metric']}: challenger {d['challenger']} vs production {d['champion']} (delta {d['delta']})\n"
        f"- reason: {d['reason']}\n- batches added: {[a['batch'] for a in added]}\n",
        key="medflow-promotion", description="Retraining outcome")
    return {"added": added, "stages": stages, **result}


if __name__ == "__main__":
    retraining_flow()
