"""Training flow: the ``dvc.yaml`` pipeline, one Prefect task run per DVC stage.

The stage list comes from DVC (foreach expanded, upstream first). Each task asks DVC whether its
stage changed; an unchanged stage is skipped, a changed one runs the same :mod:`medflow.stages`
function as ``dvc repro`` in this process and is committed to ``dvc.lock`` — so after a run
``dvc status`` is clean and ``dvc repro`` has nothing left to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

import flows  # noqa: F401  (telemetry off, PREFECT_HOME) before prefect is imported
from medflow import orchestrate
from medflow.config import load_params
from medflow.layout import Layout
from medflow.promote import retrain_config, retrain_lock


def _retry_transient(task: Any, run: Any, state: Any) -> bool:
    """Retry only errors another attempt may fix (not bad config, failed validation, missing weights)."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, orchestrate.permanent_errors())


@task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=_retry_transient)
def dvc_stage(root: str, stage: str, force: bool = False) -> dict[str, Any]:
    """Run one DVC stage unless ``dvc status`` says it is up to date; a retry keeps outputs (resume)."""
    logger = get_run_logger()
    result = orchestrate.run_stage(root, stage, force=force, fresh=task_run.run_count <= 1)
    if result["status"] == "skipped":
        logger.info("stage %s is up to date (dvc status clean): skipped", stage)
    else:
        logger.info("stage %s ran (%s) and was committed to dvc.lock: %s", stage,
                    result["changes"] or "forced", result["summary"])
    return result


def _publish_artifacts(root: Path, results: list[dict[str, Any]]) -> None:
    """Stage summary, comparison table and a link to the HTML report as Prefect artifacts."""
    import pandas as pd

    layout = Layout(root)
    lines = ["| stage | status |", "|---|---|"] + [f"| `{r['stage']}` | {r['status']} |" for r in results]
    create_markdown_artifact("\n".join(lines), key="medflow-stages", description="DVC stages of this run")
    if layout.comparison.exists():
        table = pd.read_csv(layout.comparison)
        rows = table.astype(object).where(table.notna(), None).to_dict(orient="records")
        create_table_artifact(rows, key="medflow-comparison", description="Models ranked on the test split")
    if layout.report.exists():
        create_link_artifact(layout.report.resolve().as_uri(), link_text="medflow report (reports/index.html)",
                             key="medflow-report", description="Self-contained HTML report")


@flow(name="training", log_prints=True)
def training_flow(root: str = ".", force: bool = False, stages: list[str] | None = None) -> dict[str, Any]:
    """Run the pipeline's changed stages in DVC order; ``stages`` limits it, ``force`` runs even unchanged ones."""
    logger = get_run_logger()
    path = Path(root).resolve()
    cfg = retrain_config(load_params(path / "params.yaml"))
    names = orchestrate.pipeline_stages(path)
    unknown = sorted(set(stages or []) - set(names))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; dvc.yaml has {names}")
    results = []
    with retrain_lock(path):  # not beside a retraining run: its promotion reads what these stages write
        for name in names if stages is None else [n for n in names if n in stages]:
            run = dvc_stage.with_options(name=name, task_run_name=name, retries=cfg.task_retries,
                                         retry_delay_seconds=cfg.retry_delay_s)
            results.append(run(str(path), name, force))
    ran = [r["stage"] for r in results if r["status"] == "ran"]
    skipped = [r["stage"] for r in results if r["status"] == "skipped"]
    logger.info("ran %s; skipped (unchanged) %s", ran, skipped)
    _publish_artifacts(path, results)
    return {"ran": ran, "skipped": skipped}


if __name__ == "__main__":
    training_flow()
