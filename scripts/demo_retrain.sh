#!/usr/bin/env bash
# End-to-end check of scheduled retraining, on a throw-away copy of the project (tiny settings):
#   1. build a demo project (this dvc.yaml + src, 40 malaria images per class, one 32-px CNN, 10 epochs)
#   2. start a local Prefect server and serve the deployments (scripts/serve_flows.sh)
#   3. first release: run the `retraining` deployment (trains; promotes version 1 to models/production if it
#      has skill, i.e. beats always predicting the most frequent class)
#   4. drop a stain-shifted, labelled batch into data/batches/incoming/ and run the `monitoring` deployment
#   5. wait for the retraining run that monitoring starts, print the promotion decision and the registry
#   6. stop everything by PID (scripts/stop_flows.sh), also on error or Ctrl-C
# DEMO_DIR=... keeps the project somewhere else (default: a new temp folder, kept for inspection).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=$REPO/.venv/bin/python
export DEMO_DIR=${DEMO_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/medflow-demo.XXXXXX")}
export MEDFLOW_ROOT=$DEMO_DIR PREFECT_HOME=$DEMO_DIR/.prefect PREFECT_PORT=${PREFECT_PORT:-4217}
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=$REPO
export PATH=$REPO/.venv/bin:$PATH
trap '"$REPO/scripts/stop_flows.sh"' EXIT

echo "== 1. demo project in $DEMO_DIR"
"$PY" - <<'PY'
import os, shutil, subprocess
from pathlib import Path
import yaml
repo, demo = Path(os.environ["PYTHONPATH"]), Path(os.environ["DEMO_DIR"])
for cls in ("Parasitized", "Uninfected"):
    files = sorted((repo / "data/raw/malaria-cells-400" / cls).glob("*.png"))
    for i, f in enumerate(files[:80]):  # 40 for training, 40 kept back for the new batch
        dest = demo / ("data/raw/cells" if i < 40 else "held-back") / cls / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
shutil.copytree(repo / "src", demo / "src", ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
shutil.copy2(repo / "dvc.yaml", demo / "dvc.yaml")
(demo / "data/raw/extra").mkdir(parents=True, exist_ok=True)
(demo / "data/raw/extra/README.md").write_text("Labelled batches added by the retraining flow (one .dvc each).\n")
raw = yaml.safe_load((repo / "params.yaml").read_text())
raw["data"]["source"] = "data/raw/cells"
from medflow.config import DataConfig
if "extra_sources" in DataConfig.model_fields:
    raw["data"]["extra_sources"] = ["data/raw/extra/*/"]
else:
    print("WARNING: data.extra_sources is not supported yet: the new batch cannot reach training")
raw["ingest"]["image_size"] = 32
raw["validate"]["min_rows_per_class"] = 5
raw["models"] = {"basic_cnn": {**raw["models"]["basic_cnn"], "input_size": 32, "epochs": 10, "batch_size": 16}}
raw["active_models"] = ["basic_cnn"]
raw["evaluate"].update(bootstrap=0, gradcam_per_class=1, misclassified_max=4)
raw.setdefault("retrain", {}).update(min_improvement=0.0, max_class_drop=0.2, trigger="deployment", retry_delay_s=5,
                                    settle_s=0)  # the batch is written just before the run
(demo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
subprocess.run(["git", "init", "-q"], cwd=demo, check=True)
subprocess.run(["dvc", "init", "-q"], cwd=demo, check=True)
subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=demo, check=True)
PY

echo "== 2. Prefect server + deployments"
"$REPO/scripts/serve_flows.sh"

echo "== 3. first release (retraining deployment, no new data yet)"
prefect deployment run retraining/retraining --watch --watch-timeout 900

echo "== 4. a drifted, labelled batch arrives; monitoring deployment"
"$PY" - <<'PY'
import os
from pathlib import Path
import cv2
from medflow.monitor.simulate import simulate_batch
demo = Path(os.environ["DEMO_DIR"])
files = sorted((demo / "held-back").glob("*/*.png"))
images = [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]
out = simulate_batch(images, [f.parent.name for f in files], demo / "data/batches/incoming/stain-shift",
                     shift="stain", strength=0.9, n=len(files), seed=1)
print("batch written:", out)
PY
STARTED=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)
prefect deployment run monitoring/monitoring --watch --watch-timeout 900

echo "== 5. waiting for the retraining run started by monitoring"
"$PY" - "$STARTED" <<'PY'
import sys, time
from datetime import datetime
import flows  # noqa: F401
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter, FlowRunFilterStartTime
since = datetime.fromisoformat(sys.argv[1])
deadline = time.time() + 1200
with get_client(sync_client=True) as client:
    while True:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["retraining"])),
                                     flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)))
        done = [r for r in runs if r.state and r.state.is_final()]
        if done:
            print(f"retraining run {done[0].name}: {done[0].state.type.value}")
            sys.exit(0 if done[0].state.is_completed() else 1)
        if time.time() > deadline:
            sys.exit("no retraining run finished in 20 minutes (did monitoring see drift?)")
        time.sleep(5)
PY

echo "== 6. decision"
cat "$DEMO_DIR/reports/retraining/last_decision.json"
"$PY" -c "
import json, sys; from medflow import promote
root = sys.argv[1]; reg = promote.load_registry(root)
print('production ->', promote.production_version(root))
for v in reg['versions']: print(f\"  {v['version']}: {v['metric']}={v['metrics'].get(v['metric'])} data={v['data_version']}\")
for h in reg['history']: print('  ', h['at'], h['action'], h['version'])
" "$DEMO_DIR"
echo "monitoring report(s): $DEMO_DIR/reports/monitoring/"
