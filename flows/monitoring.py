"""Monitoring flow: check each new batch against the production model; start retraining when needed.

New batches are folders under ``retrain.incoming_dir`` (``data/batches/incoming/<name>``; class
sub-folders when labelled) or one path given as ``batch``. Each is checked by
``medflow.monitor.run.monitor_batch`` (verdict ``ok`` | ``drift`` | ``degraded``) and then moved to
``retrain.processed_dir``. Retraining starts on drift/degradation, or when at least
``retrain.min_new_labelled`` labelled images wait in processed batches that are not yet training data.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (telemetry off, PREFECT_HOME) before prefect is imported
from flows.retraining import pending_batches, retraining_flow
from medflow.config import load_params
from medflow.layout import Layout
from medflow.promote import PRODUCTION, RetrainBusy, retrain_config

RETRAIN_DEPLOYMENT = "retraining/retraining"  # <flow name>/<deployment name> (see flows/deploy.py)


def champion_record(root: Path) -> Path:
    """The record of the deployed model (``models/production``), else the last run's champion."""
    production = root / PRODUCTION / "champion.json"
    return production if production.exists() else Layout(root).champion


@task(cache_policy=NO_CACHE, persist_result=False, retries=1, retry_delay_seconds=10)
def check_batch(root: str, batch: str) -> dict[str, Any]:
    """Run the monitor on one batch; returns its summary (``verdict`` among them)."""
    from medflow import stages

    path = Path(root)
    result = stages.monitor(load_params(path / "params.yaml"), Path(batch), Layout(path),
                            champion=champion_record(path))
    get_run_logger().info("batch %s: verdict %s", Path(batch).name, result.get("verdict"))
    return result


def archive_batch(batch: Path, processed: Path, incoming: Path) -> Path:
    """Move a batch from the incoming folder to the processed one (copy when it lives elsewhere)."""
    processed.mkdir(parents=True, exist_ok=True)
    dest = processed / batch.name
    n = 1
    while dest.exists():
        dest, n = processed / f"{batch.name}-{n}", n + 1
    if batch.resolve().parent == incoming.resolve():
        os.replace(batch, dest)
    else:
        shutil.copytree(batch, dest)
    return dest


def start_retraining(root: str, how: Literal["auto", "deployment", "subflow", "none"]) -> str:
    """Start the retraining deployment (don't wait) or, without one, run the retraining flow as a subflow."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    logger = get_run_logger()
    if how == "none":
        return "not started (retrain.trigger: none)"
    if how in ("auto", "deployment"):
        try:
            run = run_deployment(RETRAIN_DEPLOYMENT, parameters={"root": root}, timeout=0, as_subflow=False)
            return f"deployment run {run.name} ({run.id})"
        except ObjectNotFound:
            if how == "deployment":
                raise
            logger.info("no %s deployment: retraining as a subflow", RETRAIN_DEPLOYMENT)
    try:
        retraining_flow(root=root)
    except RetrainBusy as e:
        logger.warning("retraining not started: %s", e)
        return "busy"
    return "subflow"


@flow(name="monitoring", log_prints=True)
def monitoring_flow(root: str = ".", batch: str | None = None,
                    trigger: Literal["auto", "deployment", "subflow", "none"] | None = None) -> dict[str, Any]:
    """Check new batches; retrain on drift/degradation or enough new labelled data (``trigger`` overrides config)."""
    logger = get_run_logger()
    path = Path(root).resolve()
    cfg = retrain_config(load_params(path / "params.yaml"))
    incoming, processed = path / cfg.incoming_dir, path / cfg.processed_dir
    if batch:
        todo = [Path(batch)]
    else:
        todo = sorted(p for p in incoming.glob("*") if p.is_dir() and not p.name.startswith("."))
    verdicts = {}
    for b in todo:
        result = check_batch.with_options(task_run_name=f"monitor {b.name}")(str(path), str(b))
        verdicts[archive_batch(b, processed, incoming).name] = result.get("verdict")
    waiting = sum(pending_batches(path, cfg).values())
    reasons = [f"{name}: {v}" for name, v in verdicts.items() if v in ("drift", "degraded")]
    if waiting >= cfg.min_new_labelled:
        reasons.append(f"{waiting} new labelled images >= retrain.min_new_labelled={cfg.min_new_labelled}")
    started = start_retraining(str(path), trigger or cfg.trigger) if reasons else None
    logger.info("verdicts %s; labelled images waiting %d; retraining: %s (%s)", verdicts, waiting, started, reasons)
    return {"verdicts": verdicts, "labelled_waiting": waiting, "retrain_reasons": reasons, "retraining": started}


if __name__ == "__main__":
    monitoring_flow()
