"""Monitoring flow: check each new batch against the production model; start retraining when needed.

New batches are folders under ``retrain.incoming_dir`` (``data/batches/incoming/<name>``; class
sub-folders when labelled) or one path given as ``batch``. Each is checked by
``medflow.monitor.run.monitor_batch`` (verdict ``ok`` | ``drift`` | ``degraded``) and then moved to
``retrain.processed_dir``. A folder in which something changed less than ``retrain.settle_s`` ago is
still being copied and waits for the next run. A batch the monitor cannot check (e.g. empty, or no usable image) is moved
to ``retrain.failed_dir`` with ``<name>.error.txt`` beside it and gets a ``failed`` line in
``reports/monitoring/history.csv`` (``medflow.monitor.run.record_failure``: the reason and where its files
went); the other batches and the retraining decision go on, and the flow run then fails naming those
batches. Retraining starts on drift/degradation, or when at least ``retrain.min_new_labelled`` labelled
images (images in folders named after the production model's classes) wait in processed batches that are
not yet training data.
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import flows  # noqa: F401  (telemetry off, PREFECT_HOME) before prefect is imported
from flows.retraining import pending_batches, retraining_flow
from medflow import orchestrate
from medflow.config import load_params
from medflow.layout import Layout, batch_name, free_name
from medflow.monitor.run import record_failure
from medflow.promote import RetrainBusy, retrain_config

RETRAIN_DEPLOYMENT = "retraining/retraining"  # <flow name>/<deployment name> (see flows/deploy.py)


class BatchesFailed(RuntimeError):
    """Some batches could not be monitored (moved to ``retrain.failed_dir``); ``summary`` is the flow's result."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def _retry_transient(task: Any, run: Any, state: Any) -> bool:
    """Retry only errors another attempt may fix: not bad config, nor a batch without usable images."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (*orchestrate.permanent_errors(), ValueError))


# retries / delay are overridden in the flow from retrain.task_retries / retrain.retry_delay_s
@task(cache_policy=NO_CACHE, persist_result=False, retries=1, retry_delay_seconds=10,
      retry_condition_fn=_retry_transient)
def check_batch(root: str, batch: str, name: str | None = None) -> dict[str, Any]:
    """Run the monitor on one batch (its report under ``name``); returns its summary (``verdict`` among them)."""
    from medflow import stages

    path = Path(root)
    result = stages.monitor(load_params(path / "params.yaml"), Path(batch), Layout(path), name=name,
                            champion=Layout(path).deployed_champion)
    get_run_logger().info("batch %s: verdict %s", Path(batch).name, result.get("verdict"))
    return result


def last_change(folder: Path) -> float:
    """The newest inode change time (``st_ctime``) of ``folder`` and everything under it. A file being written,
    copied or renamed in gets a new ctime, and unlike the modification time no copy tool can backdate it
    (``cp -p``, ``rsync -t``)."""
    newest = folder.stat().st_ctime
    for dirpath, dirnames, filenames in os.walk(folder):
        for entry in (*dirnames, *filenames):
            newest = max(newest, os.lstat(os.path.join(dirpath, entry)).st_ctime)
    return newest


def archive_batch(batch: Path, processed: Path, incoming: Path, name: str | None = None) -> Path:
    """Move a batch from the incoming folder to ``processed/<name>`` (default: the batch's; copy when it lives
    elsewhere); a taken name gets ``-1``, ``-2`` ... appended."""
    processed.mkdir(parents=True, exist_ok=True)
    dest = processed / free_name(name or batch.name, processed)
    if batch.resolve().parent == incoming.resolve():
        os.replace(batch, dest)
    else:
        shutil.copytree(batch, dest)
    return dest


def fail_batch(batch: Path, failed: Path, incoming: Path, error: BaseException) -> Path:
    """Move a batch the monitor could not check to ``failed`` (as :func:`archive_batch` does) and write
    ``<failed>/<name>.error.txt`` (exception type and message, then the traceback) beside it."""
    dest = archive_batch(batch, failed, incoming)
    tb = "".join(traceback.format_exception(error)).rstrip()
    (failed / f"{dest.name}.error.txt").write_text(
        f"{type(error).__name__}: {error}\n\nbatch: {batch}\nmoved to: {dest}\n"
        f"time: {datetime.now(UTC).isoformat(timespec='seconds')}\n\n{tb}\n", encoding="utf-8")
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
    incoming, processed, failed = path / cfg.incoming_dir, path / cfg.processed_dir, path / cfg.failed_dir
    if batch:
        todo = [Path(batch)]
    else:
        todo = sorted(p for p in incoming.glob("*") if p.is_dir() and not p.name.startswith("."))
        ages = {p: time.time() - last_change(p) for p in todo}
        for p in [p for p in todo if ages[p] < cfg.settle_s]:
            logger.info("%s changed %.0f s ago (< retrain.settle_s %g): still being copied? Left for the next run",
                        p, ages[p], cfg.settle_s)
            todo.remove(p)
        for loose in sorted(p for p in incoming.glob("*") if p.is_file() and not p.name.startswith(".")):
            logger.warning("%s is a file, not a batch folder: left alone. Put each batch in its own folder "
                           "(%s/<batch>/<class>/<image>, unlabelled images in <batch>/unlabelled/); unpack archives "
                           "first", loose, cfg.incoming_dir)
    record = Layout(path).deployed_champion
    if todo and not record.is_file():  # no model to check against: not the batches' fault
        raise FileNotFoundError(f"{record}: no model to monitor against (train and promote one "
                                f"first); {len(todo)} batch(es) left in place")
    check = check_batch.with_options(retries=cfg.task_retries, retry_delay_seconds=cfg.retry_delay_s)
    verdicts: dict[str, Any] = {}
    failures: dict[str, str] = {}  # batch name -> where it went and why
    for b in todo:
        name = free_name(batch_name(b), Layout(path).monitoring, processed)  # its report and its archive share it
        try:
            result = check.with_options(task_run_name=f"monitor {b.name}")(str(path), str(b), name)
        except Exception as e:  # noqa: BLE001  (one bad batch must not block the others; re-raised below)
            logger.error("batch %s could not be monitored: %s: %s", b.name, type(e).__name__, e)
            try:
                dest = fail_batch(b, failed, incoming, e)
                where = f"moved to {dest} (see {dest.name}.error.txt there)"
            except OSError as move_error:
                logger.error("batch %s could not be moved to %s: %s", b.name, failed, move_error)
                where = f"left in place at {b} (move failed: {move_error})"
            failures[b.name] = f"{where}: {type(e).__name__}: {e}"
            record_failure(Layout(path).monitoring, name, e, where)  # a history line, no report folder
            continue
        verdicts[archive_batch(b, processed, incoming, result.get("batch", name)).name] = result.get("verdict")
    waiting = sum(pending_batches(path, cfg).values())
    reasons = [f"{name}: {v}" for name, v in verdicts.items() if v in ("drift", "degraded")]
    if waiting >= cfg.min_new_labelled:
        reasons.append(f"{waiting} new labelled images >= retrain.min_new_labelled={cfg.min_new_labelled}")
    started = start_retraining(str(path), trigger or cfg.trigger) if reasons else None
    logger.info("verdicts %s; labelled images waiting %d; retraining: %s (%s)", verdicts, waiting, started, reasons)
    summary = {"verdicts": verdicts, "labelled_waiting": waiting, "retrain_reasons": reasons, "retraining": started,
               "failed": failures}
    if failures:
        raise BatchesFailed(f"{len(failures)} batch(es) could not be monitored: "
                            + "; ".join(f"{name} {how}" for name, how in failures.items()), summary)
    return summary


if __name__ == "__main__":
    monitoring_flow()
