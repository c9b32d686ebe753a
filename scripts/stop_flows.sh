#!/usr/bin/env bash
# Stop what serve_flows.sh started, by the PIDs in $PREFECT_HOME: first the deployments (`serve`,
# which also ends its flow runs), then the runs it left RUNNING are marked Crashed (they would hold
# their deployment's concurrency slot), then the server. SIGTERM to the process group, SIGKILL after 30 s.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=$(cd "${MEDFLOW_ROOT:-$REPO}" && pwd)
export PREFECT_HOME=${PREFECT_HOME:-$ROOT/.prefect}
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
# the port serve_flows.sh recorded, so a server started on another port is found without PREFECT_PORT
export PREFECT_API_URL=http://127.0.0.1:${PREFECT_PORT:-$(cat "$PREFECT_HOME/server.port" 2>/dev/null || echo 4200)}/api

stop() {
  local file=$PREFECT_HOME/$1.pid pid
  [[ -f $file ]] || { echo "$1: not running (no $file)"; return 0; }
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"
    fi
    echo "$1: stopped (pid $pid)"
  else
    echo "$1: was not running (stale pid $pid)"
  fi
  rm -f "$file"
}

stop serve
if [[ -f $PREFECT_HOME/server.pid ]] && kill -0 "$(cat "$PREFECT_HOME/server.pid")" 2>/dev/null; then
  (cd "$REPO" && "$REPO/.venv/bin/python" -m flows.deploy --root "$ROOT" --reap) || echo "could not mark runs crashed"
fi
stop server
rm -f "$PREFECT_HOME/server.port"
