#!/usr/bin/env bash
# Stop what serve_flows.sh started, by the PIDs in $PREFECT_HOME: first the deployments (`serve`,
# which also ends its flow runs), then the server. SIGTERM to the process group, SIGKILL after 30 s.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=$(cd "${MEDFLOW_ROOT:-$REPO}" && pwd)
PREFECT_HOME=${PREFECT_HOME:-$ROOT/.prefect}

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
stop server
