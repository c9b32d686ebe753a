"""Deployments of the three flows, with the cron schedules of ``params.yaml`` ``retrain:``.

``python -m flows.deploy`` serves them from this process (``make serve-flows`` starts it next to a
local Prefect server); ``python -m flows.deploy --work-pool NAME`` registers them on a work pool
instead, so that ``prefect worker start --pool NAME`` on a GPU machine runs them.
Each deployment runs one at a time (``concurrency_limit=1``, extra runs queue); training and retraining
also share the project's pipeline lock (``models/.retrain.lock``), so neither runs beside the other.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import Flow, serve
from prefect.client.schemas.objects import (
    ConcurrencyLimitConfig,
    ConcurrencyLimitStrategy,
)
from prefect.schedules import Cron

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


def serve_all(root: Path) -> None:
    """Serve every deployment from this process until interrupted (SIGINT/SIGTERM)."""
    specs = deployment_specs(root)
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
    args = ap.parse_args(argv)
    root = args.root.resolve()
    if args.work_pool:
        deploy_to_pool(root, args.work_pool)
    else:
        serve_all(root)


if __name__ == "__main__":
    main()
