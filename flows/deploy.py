"""Deployments of the three flows, with the cron schedules of ``params.yaml`` ``retrain:``.

``python -m flows.deploy`` serves them from this process (``make serve-flows`` starts it next to a
local Prefect server); ``python -m flows.deploy --work-pool NAME`` registers them on a work pool
instead, so that ``prefect worker start --pool NAME`` on a GPU machine runs them.
Each deployment runs one at a time (``concurrency_limit=1``, extra runs queue); training and retraining
also share the project's pipeline lock (``models/.retrain.lock``), so neither runs beside the other.
Served runs execute inside the serving process, so runs it left RUNNING when it was stopped or killed
cannot be alive: they are marked Crashed when serving starts again (``--reap`` does it on demand, as
``make stop-flows`` does), which frees the deployment's concurrency slot for the next run.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from prefect import Flow, serve
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import (
    ConcurrencyLimitConfig,
    ConcurrencyLimitStrategy,
    StateType,
)
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron
from prefect.states import Crashed

import flows  # noqa: F401  (telemetry off, PREFECT_HOME) before prefect is imported
from flows.monitoring import monitoring_flow
from flows.retraining import retraining_flow
from flows.training import training_flow
from medflow.config import load_params
from medflow.promote import retrain_config

REPO = Path(__file__).resolve().parents[1]
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def deployment_specs(root: Path) -> list[dict[str, Any]]:
    """Name, flow, entrypoint, schedules and limits of every deployment (shared by serve and work-pool modes)."""
    cfg = retrain_config(load_params(root / "params.yaml"))
    common = {"parameters": {"root": str(root)}, "tags": ["medflow"]}
    return [
        {"flow": training_flow, "entrypoint": "flows/training.py:training_flow", "name": "training",
         "concurrency_limit": ONE_AT_A_TIME, "description": "The dvc.yaml pipeline; unchanged stages are skipped.",
         **common},
        {"flow": monitoring_flow, "entrypoint": "flows/monitoring.py:monitoring_flow", "name": "monitoring",
         "schedules": [Cron(cfg.schedule_monitor, timezone=cfg.timezone)], "concurrency_limit": ONE_AT_A_TIME,
         "description": "Monitor new batches; start retraining on drift/degradation or new labelled data.", **common},
        {"flow": retraining_flow, "entrypoint": "flows/retraining.py:retraining_flow", "name": "retraining",
         "schedules": [Cron(cfg.schedule_retrain, timezone=cfg.timezone)], "concurrency_limit": ONE_AT_A_TIME,
         "description": "Add labelled batches, retrain, promote only a better model.", **common},
    ]


LIVE_STATES = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]


def deployment_names(specs: list[dict[str, Any]]) -> list[str]:
    """``flow/deployment`` names of :func:`deployment_specs`, as Prefect reads them."""
    return [f"{s['flow'].name}/{s['name']}" for s in specs]


def reap_orphaned_runs(names: list[str]) -> list[str]:
    """Mark runs of the deployments ``names`` still pending/running as Crashed (their serving process is gone).

    Left as they are, they hold the deployment's concurrency slot (limit 1), so every later run would
    wait in AwaitingConcurrencySlot forever. Returns the names of the runs marked.
    """
    from prefect.client.orchestration import get_client

    reaped = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue  # never served yet
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=LIVE_STATES))),
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
            for run in runs:
                client.set_flow_run_state(run.id, Crashed(message="the process serving this run was stopped"),
                                          force=True)
                reaped.append(f"{name}: {run.name}")
    for run in reaped:
        print(f"marked crashed (its serving process had ended): {run}")
    return reaped


def serve_all(root: Path) -> None:
    """Serve every deployment from this process until interrupted (SIGINT/SIGTERM)."""
    specs = deployment_specs(root)
    reap_orphaned_runs(deployment_names(specs))
    # Prefect 3.8's SIGTERM handler calls the coroutine Runner.stop() without awaiting it (runner.py); the shutdown
    # still completes ("All deployments have been paused!"), so its RuntimeWarning is noise in serve.log
    warnings.filterwarnings("ignore", message="coroutine 'Runner.astop' was never awaited", category=RuntimeWarning)
    serve(*[s.pop("flow").to_deployment(**{k: v for k, v in s.items() if k != "entrypoint"}) for s in specs])


def deploy_to_pool(root: Path, pool: str) -> None:
    """Register every deployment on work pool ``pool`` (code read from this checkout by the worker)."""
    for s in deployment_specs(root):
        s.pop("flow")
        flow = Flow.from_source(source=str(REPO), entrypoint=s.pop("entrypoint"))
        flow.deploy(work_pool_name=pool, build=False, push=False, print_next_steps=False, **s)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("."), help="project root the flows work on")
    ap.add_argument("--work-pool", help="register on this work pool instead of serving")
    ap.add_argument("--reap", action="store_true", help="only mark runs left by a stopped `serve` as crashed")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    if args.reap:
        reap_orphaned_runs(deployment_names(deployment_specs(root)))
    elif args.work_pool:
        deploy_to_pool(root, args.work_pool)
    else:
        serve_all(root)


if __name__ == "__main__":
    main()
