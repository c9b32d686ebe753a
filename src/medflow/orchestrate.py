"""The DVC pipeline as the flows see it: stage order, per-stage status, in-process run + commit.

``dvc.yaml`` is the one definition of the pipeline. These helpers read it through DVC's own API
(foreach expanded, ``train@<model>`` addressing), and run one stage the way ``dvc repro`` does —
remove its (non-persistent) outputs, run the stage function of :mod:`medflow.stages` in this
process, then ``dvc commit --force`` the stage so ``dvc.lock`` records exactly what was produced.
No Prefect here: the flows wrap these functions in tasks.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medflow import stages
from medflow.config import Params, load_params
from medflow.layout import Layout

log = logging.getLogger(__name__)
_CWD_LOCK = threading.RLock()


@contextmanager
def dvc_repo(root: str | Path) -> Iterator[Any]:
    """``dvc.repo.Repo`` of ``root``, used with the working directory inside it.

    Parts of DVC (the run cache) resolve paths against the working directory, as the ``dvc`` CLI
    always runs there; the change is serialised and undone afterwards.
    """
    from dvc.repo import Repo

    with _CWD_LOCK:
        before = os.getcwd()
        os.chdir(root)
        try:
            with Repo(str(root)) as repo:
                yield repo
        finally:
            os.chdir(before)


def pipeline_stages(root: str | Path) -> list[str]:
    """Addressing names of the ``dvc.yaml`` stages (``ingest``, ``train@basic_cnn`` ...), upstream first.

    The order is DVC's own reproduction plan (post-order over the stage graph); data sources
    (``*.dvc`` files) are left out — they are inputs, not steps.
    """
    from dvc.repo.reproduce import plan_repro
    from dvc.stage import PipelineStage

    root = Path(root).resolve()
    with dvc_repo(root) as repo:
        plan = [s for s in plan_repro(repo.index.graph) if isinstance(s, PipelineStage)]
    return [s.name if Path(s.path) == root / "dvc.yaml" else f"{Path(s.path).relative_to(root)}:{s.name}"
            for s in plan]


def _target(root: str | Path, name: str) -> str:
    """A DVC target that does not depend on the working directory: ``<root>/dvc.yaml:<name>``."""
    file, sep, stage = name.rpartition(":")
    return f"{Path(root).resolve() / (file if sep else 'dvc.yaml')}:{stage}"


def stage_changes(root: str | Path, name: str) -> list[Any]:
    """What ``dvc status <name>`` reports for this stage alone; empty when it is up to date."""
    with dvc_repo(root) as repo:
        status = repo.status(targets=[_target(root, name)])
    return [change for changes in status.values() for change in changes]


def remove_outputs(root: str | Path, name: str) -> None:
    """Remove the stage's outputs before a run, exactly as ``dvc repro`` does (``persist`` ones are kept)."""
    with dvc_repo(root) as repo, repo.lock:
        for stage in repo.stage.collect(_target(root, name)):
            stage.remove_outs(ignore_remove=False, force=False)


def commit_stage(root: str | Path, name: str) -> None:
    """``dvc commit --force <name>``: hash deps, params and outs into ``dvc.lock`` (and the cache)."""
    with dvc_repo(root) as repo:
        repo.commit(_target(root, name), force=True)


def stage_function(name: str) -> Callable[[Params, Layout], dict]:
    """The :mod:`medflow.stages` function behind a stage name; ``train@m`` -> ``stages.train(params, "m", ...)``."""
    base, _, item = name.rpartition(":")[2].partition("@")
    fn = getattr(stages, base, None)
    if fn is None or base.startswith("_"):
        raise KeyError(f"dvc.yaml stage {name!r} has no function medflow.stages.{base}")
    if item:
        return lambda params, layout: fn(params, item, layout=layout)
    return lambda params, layout: fn(params, layout=layout)


def run_stage(root: str | Path, name: str, *, force: bool = False, fresh: bool = True) -> dict[str, Any]:
    """Run one stage if DVC says it changed (or ``force``); commit it; return what happened.

    ``fresh=False`` keeps existing outputs (a retry resumes from training checkpoints).
    Returns ``{"stage", "status": "skipped" | "ran", "changes", "summary"}``.
    """
    root = Path(root).resolve()
    changes = stage_changes(root, name)
    if not changes and not force:
        return {"stage": name, "status": "skipped", "changes": [], "summary": None}
    log.info("stage %s changed: %s", name, changes or "forced")
    if fresh:
        remove_outputs(root, name)
    params = load_params(root / "params.yaml")
    summary = stage_function(name)(params, Layout(root))
    commit_stage(root, name)
    return {"stage": name, "status": "ran", "changes": [str(c) for c in changes], "summary": summary}


def permanent_errors() -> tuple[type[BaseException], ...]:
    """Errors that another attempt cannot fix (bad config or data): never retried."""
    from medflow.config import ConfigError

    errors: list[type[BaseException]] = [ConfigError, KeyError]
    for mod, attr in [("medflow.data.validate", "ValidationFailed"), ("medflow.models.weights", "WeightsUnavailable"),
                      ("medflow.data.sources", "SourceError"), ("medflow.layout", "OutOfDate")]:
        try:
            errors.append(getattr(__import__(mod, fromlist=[attr]), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)
