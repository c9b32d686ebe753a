"""Retraining flow: add new labelled batches to the training data, retrain, promote only a better model.

One run at a time (a file lock here, ``concurrency_limit=1`` on the deployment): a second run is
rejected with :class:`medflow.promote.RetrainBusy`. A batch's labelled images are those in sub-folders
named after a class of the production model (:func:`labelled_classes`); other folders (e.g.
``unlabelled/``) are only monitored. Each labelled batch's class folders are copied to
``data/raw/extra/<batch>/<class>/`` and ``dvc add``-ed (its ``.dvc`` hash is the data version);
ingest reads it through ``data.extra_sources`` as ``extra`` rows, which the split stage puts in train
without moving any other row (one linked to a val/test patient or image is excluded), so val and
test — and with them the comparison with the production model — stay fixed. A failed stage fails the flow before the
promotion step, so production is untouched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

import flows  # noqa: F401  (telemetry off, PREFECT_HOME) before prefect is imported
from flows.training import dvc_stage, training_flow
from medflow.config import Params, load_params
from medflow.data.images import DICOM_SUFFIXES, IMAGE_SUFFIXES, sniff_format
from medflow.data.sources import list_files
from medflow.io import read_csv, sha256_file
from medflow.layout import Layout
from medflow.monitor.simulate import SIMULATED_MARKER
from medflow.orchestrate import dvc_repo, pipeline_stages
from medflow.promote import (
    PromotionError,
    RetrainConfig,
    adopt_current_champion,
    decide_and_promote,
    dvc_data_version,
    retrain_config,
    retrain_lock,
)

NOT_ADDED_MARKER = ".medflow-not-added.json"  # in a processed batch with nothing new to train on: why
_UNLABELLED_NOTE = "folders not named after a class of the production model hold unlabelled images"
_HEAD_BYTES = 132  # enough for the DICOM magic at bytes 128..132 and every image magic


def _logger() -> Any:
    """The Prefect run logger inside a flow/task run, else a plain logger (helpers called directly)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("medflow.flows.retraining")


def _classes_in(path: Path) -> list[str] | None:
    """The non-empty ``classes`` list of a JSON record (champion.json, meta.json), else None."""
    if not path.is_file():
        return None
    try:
        classes = json.loads(path.read_text()).get("classes")
    except (OSError, ValueError, AttributeError) as e:
        _logger().warning("%s: cannot read its classes (%s)", path, e)
        return None
    return [str(c) for c in classes] if isinstance(classes, list) and classes else None


def labelled_classes(root: Path, params: Params | None = None) -> tuple[list[str] | None, str]:
    """The class names a batch sub-folder must have to count as labelled, and where they come from.

    The classes of the model in production — the record the monitoring flow checks batches against
    (``Layout.deployed_champion``) — else ``data.labels``, else the processed data's ``meta.json``;
    ``(None, reason)`` when none is known (then no folder counts as labelled).
    """
    root = Path(root)
    record = Layout(root).deployed_champion
    if classes := _classes_in(record):
        return classes, str(record)
    params = params if params is not None else load_params(root / "params.yaml")
    if params.data.labels:
        return list(params.data.labels), "params.yaml data.labels"
    meta = Layout(root).processed / "meta.json"
    if classes := _classes_in(meta):
        return classes, str(meta)
    return None, f"no champion record with classes ({record}), no data.labels, no {meta}"


def _is_image(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            return sniff_format(f.read(_HEAD_BYTES)) is not None
    except OSError:
        return False


def class_files(folder: Path) -> list[Path]:
    """The images ingest reads from one class folder, sorted.

    Ingest takes every file :func:`medflow.data.sources.list_files` lists (hidden files and folders
    skipped) and decides by content; kept here are those with an image/DICOM suffix
    (:data:`medflow.data.images.IMAGE_SUFFIXES`, ``DICOM_SUFFIXES``) or whose leading bytes are an image
    or DICOM (e.g. DICOM without a suffix); other files (notes, CSVs) are left out.
    """
    return sorted(Path(f) for f in list_files(str(folder)) if _is_image(Path(f)))


def class_folders(batch: Path, classes: list[str] | None, source: str = "") -> dict[str, list[Path]]:
    """``{class: image files}`` for the sub-folders of ``batch`` named after one of ``classes``.

    Other sub-folders (e.g. ``unlabelled/``) hold unlabelled images (the monitor's convention): they
    are ignored for retraining, and logged with their image count.
    """
    known = set(classes or [])
    out, ignored = {}, {}
    for d in sorted(p for p in batch.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = class_files(d)
        if d.name in known:
            if files:
                out[d.name] = files
        elif files:
            ignored[d.name] = len(files)
    if ignored:
        _logger().info("batch %s: %d image(s) in %s ignored for retraining (%s; classes %s from %s)",
                       batch.name, sum(ignored.values()), ignored, _UNLABELLED_NOTE, classes, source)
    return out


def training_hashes(root: Path, cfg: RetrainConfig) -> set[str]:
    """sha256 of every image file already in the training data: the ingest manifest's, plus the files of
    ``extra_dir`` batches added since the manifest was written (e.g. earlier in this retraining run)."""
    manifest, extra = Layout(root).manifest, root / cfg.extra_dir
    known: set[str] = set()
    since = 0.0
    if manifest.is_file():
        known |= set(read_csv(manifest, ["sha256"], text=("sha256",))["sha256"].dropna())
        since = manifest.stat().st_mtime
    if extra.is_dir():
        for d in (p for p in extra.iterdir() if p.is_dir() and not p.name.startswith(".")):
            marker = d.with_name(f"{d.name}.dvc")
            if not marker.exists() or marker.stat().st_mtime >= since:
                known |= {sha256_file(f) for f in list_files(str(d))}
    return known


def new_labelled_files(root: Path, batch: Path, classes: list[str] | None, source: str,
                       known: set[str]) -> tuple[dict[str, list[Path]], dict[str, int]]:
    """The labelled images of ``batch`` (:func:`class_folders`) that can join the training data, and counts of
    those left out: ``already_in_training`` (same file content as a training image, e.g. a batch dropped twice,
    or twice within this batch) and ``unusable`` (quarantined when the batch was monitored). The kept files'
    hashes are added to ``known``."""
    report = Layout(root).monitoring / batch.name / "quarantine.csv"
    bad = set(read_csv(report, ["path"], text=("path",))["path"]) if report.is_file() else set()
    seen, keep, left = known, {}, {"already_in_training": 0, "unusable": 0}
    for cls, files in class_folders(batch, classes, source).items():
        for f in files:
            digest = sha256_file(f)
            if f.relative_to(batch).as_posix() in bad:
                left["unusable"] += 1
            elif digest in seen:
                left["already_in_training"] += 1
            else:
                seen.add(digest)
                keep.setdefault(cls, []).append(f)
    return keep, left


def pending_batches(root: Path, cfg: RetrainConfig, params: Params | None = None) -> dict[str, int]:
    """Processed, labelled batches not yet in the training data: ``{batch name: new labelled images}``.

    Labelled images are those in a folder named after a class of :func:`labelled_classes`; counted are
    those :func:`new_labelled_files` would add (not already in training, not unusable). A batch with none
    is reported once and marked (:data:`NOT_ADDED_MARKER`), then no longer looked at.
    """
    processed, extra = root / cfg.processed_dir, root / cfg.extra_dir
    if not processed.is_dir():
        return {}
    batches = [p for p in sorted(processed.iterdir())
               if p.is_dir() and not p.name.startswith(".") and not (extra / p.name).exists()]
    if not batches:
        return {}
    classes, source = labelled_classes(root, params)
    if classes is None:
        _logger().warning("no class list known (%s): no batch counts as labelled", source)
    out: dict[str, int] = {}
    known: set[str] | None = None
    for b in batches:
        if (b / SIMULATED_MARKER).exists():
            _logger().warning("batch %s was written by `medflow simulate-batch` from the pipeline's own held-out "
                              "images: monitored only, never added to the training data", b.name)
            continue
        if (b / NOT_ADDED_MARKER).exists():
            continue
        known = training_hashes(root, cfg) if known is None else known
        keep, left = new_labelled_files(root, b, classes, source, known)
        n = sum(len(v) for v in keep.values())
        if n:
            out[b.name] = n
        elif any(left.values()):
            why = (f"all its labelled images are already in the training data ({left['already_in_training']}) or "
                   f"were unusable when it was monitored ({left['unusable']})")
            _logger().warning("batch %s is not added to the training data: %s", b.name, why)
            (b / NOT_ADDED_MARKER).write_text(json.dumps({"batch": b.name, "reason": why, **left}, indent=2) + "\n")
    return out


def _warn_if_unused(params: Params, cfg: RetrainConfig, logger: Any) -> None:
    sources = getattr(params.data, "extra_sources", None) or []
    if not any(str(s).rstrip("/").startswith(cfg.extra_dir.rstrip("/")) for s in sources):
        logger.warning("data.extra_sources %s does not include %s/*/: the new data will not reach training",
                       sources, cfg.extra_dir)


@task(cache_policy=NO_CACHE, persist_result=False)
def add_batch(root: str, batch: str) -> dict[str, Any]:
    """Copy one processed batch's class folders to ``<extra_dir>/<batch>/`` and ``dvc add`` it.

    Only folders named after a class of :func:`labelled_classes` are copied; each file keeps its
    path relative to its class folder (``cls/a/001.png`` and ``cls/b/001.png`` are both kept).
    """
    path = Path(root)
    params = load_params(path / "params.yaml")
    cfg = retrain_config(params)
    src, dest = path / cfg.processed_dir / batch, path / cfg.extra_dir / batch
    dest.parent.mkdir(parents=True, exist_ok=True)
    if (src / SIMULATED_MARKER).exists():
        raise ValueError(f"batch {batch} was written by `medflow simulate-batch` ({src / SIMULATED_MARKER}): its "
                         "images are the pipeline's own held-out (test) images and must not reach training")
    if not dest.exists():
        classes, source = labelled_classes(path, params)
        folders, left = new_labelled_files(path, src, classes, source, training_hashes(path, cfg))
        if not folders:
            raise ValueError(f"batch {batch}: no new labelled images in {src} (none in a folder named after one of "
                             f"the classes {classes}, from {source}, that is not already in the training data "
                             f"({left['already_in_training']}) or unusable ({left['unusable']}))")
        if any(left.values()):
            _logger().warning("batch %s: %d image(s) already in the training data and %d unusable one(s) left out",
                              batch, left["already_in_training"], left["unusable"])
        tmp = dest.parent / f".{batch}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for cls, files in folders.items():
            for f in files:
                target = tmp / cls / f.relative_to(src / cls)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
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
        try:
            if adopted := adopt_current_champion(path, extra_dir=cfg.extra_dir):
                logger.info("nothing was deployed: %s, the model in use, is now the production version", adopted)
        except PromotionError as e:  # e.g. its model file is gone: then nothing was in use either
            logger.warning("the last run's champion could not be adopted as the production version: %s", e)
        todo = list(batches) if batches is not None else list(pending_batches(path, cfg, params))
        if todo:
            _warn_if_unused(params, cfg, logger)
        added = [add_batch(str(path), b) for b in todo]
        stages = training_flow(root=str(path))
        result = promote_if_better(str(path))
        if "report" in pipeline_stages(path):  # the report names the deployed model: rebuilt after the decision
            dvc_stage(str(path), "report", force=True)
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
