#!/usr/bin/env bash
# Start a local Prefect server (127.0.0.1 only, telemetry off) and serve the medflow deployments
# (training, monitoring, retraining) with the cron schedules of params.yaml `retrain:`.
# PIDs and logs go to $PREFECT_HOME (default .prefect/); stop with scripts/stop_flows.sh (make stop-flows).
# MEDFLOW_ROOT: the project the flows work on (default: this checkout). PREFECT_PORT: default 4200.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=$(cd "${MEDFLOW_ROOT:-$REPO}" && pwd)
export PREFECT_HOME=${PREFECT_HOME:-$ROOT/.prefect}
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
PORT=${PREFECT_PORT:-$(cat "$PREFECT_HOME/server.port" 2>/dev/null || echo 4200)}
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
BIN=$REPO/.venv/bin
mkdir -p "$PREFECT_HOME"

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS PYTHON-EXPRESSION-THAT-RAISES-UNTIL-READY
  "$BIN/python" - "$1" "$2" <<'PY'
import sys, time
deadline = time.time() + float(sys.argv[1])
while True:
    try:
        exec(sys.argv[2]); break
    except Exception as e:
        if time.time() > deadline:
            sys.exit(f"not ready after {sys.argv[1]} s: {e}")
        time.sleep(2)
PY
}

if running "$PREFECT_HOME/server.pid"; then
  echo "Prefect server already running (pid $(cat "$PREFECT_HOME/server.pid"))"
else
  # setsid: the server leads its own process group, so stop_flows.sh can end it and its children by PID
  setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$PREFECT_HOME/server.log" 2>&1 &
  echo $! >"$PREFECT_HOME/server.pid"
  echo "$PORT" >"$PREFECT_HOME/server.port"  # stop_flows.sh and other shells find the server by it
fi
wait_for 180 "import urllib.request; urllib.request.urlopen('$PREFECT_API_URL/health', timeout=5)"

if running "$PREFECT_HOME/serve.pid"; then
  echo "deployments already served (pid $(cat "$PREFECT_HOME/serve.pid"))"
else
  (cd "$REPO" && exec setsid "$BIN/python" -m flows.deploy --root "$ROOT") >"$PREFECT_HOME/serve.log" 2>&1 &
  echo $! >"$PREFECT_HOME/serve.pid"
fi
wait_for 180 "
import flows
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    for d in ('training/training', 'monitoring/monitoring', 'retraining/retraining'):
        c.read_deployment_by_name(d)
"
echo "Prefect UI: http://127.0.0.1:$PORT   project: $ROOT"
echo "logs: $PREFECT_HOME/server.log $PREFECT_HOME/serve.log   stop: make stop-flows"
echo "run a deployment now: PREFECT_API_URL=$PREFECT_API_URL .venv/bin/prefect deployment run monitoring/monitoring"
