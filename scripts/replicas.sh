#!/usr/bin/env bash
# A local three-replica setup: Redis + PostgreSQL (scripts/services.sh) and three `thrifty serve`
# processes on 127.0.0.1:8081-8083 sharing them, from one settings file. Ctrl-C stops everything.
#
#   bash scripts/replicas.sh [thrifty.yaml] [N]
#
# The settings file's storage.url and shared_state.url are replaced by the local servers'. The
# replicas' settings are written to ./.thrifty-replicas/; the servers' data lives in
# /tmp/thrifty-replicas-svc-UID (kept between runs, so the ledger and keys survive a restart).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-thrifty.yaml}
N=${2:-3}
[ -f "$CONFIG" ] || { echo "replicas.sh: no settings file $CONFIG (cp examples/thrifty.yaml thrifty.yaml)" >&2; exit 2; }
PY=.venv/bin/python
[ -x "$PY" ] || { echo "replicas.sh: run bash scripts/test.sh (or pip install -e '.[shared]') first" >&2; exit 2; }
STATE=$PWD/.thrifty-replicas
mkdir -p "$STATE"
bash scripts/services.sh install
SVC=/tmp/thrifty-replicas-svc-$(id -u)
eval "$(bash scripts/services.sh start "$SVC")"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  bash scripts/services.sh stop "$SVC" || true
}
trap cleanup EXIT INT TERM
for i in $(seq 1 "$N"); do
  "$PY" - "$CONFIG" "$STATE/replica-$i.yaml" "$POSTGRES_URL" "$REDIS_URL" "$STATE" "$i" <<'EOF'
import sys
from pathlib import Path

import yaml

source, target, pg, redis, state, i = sys.argv[1:]
data = yaml.safe_load(Path(source).read_text()) or {}
base = Path(source).resolve().parent
for provider in (data.get("providers") or {}).values():  # relative paths stay relative to the source
    provider["data"] = [d if d.startswith("builtin:") or Path(d).is_absolute() else str(base / d) for d in provider.get("data", [])]
storage = data.setdefault("storage", {})
storage.update({"url": pg, "spool_path": f"{state}/spool-{i}.jsonl", "local_path": f"{state}/local-{i}.db"})
data.setdefault("shared_state", {})["url"] = redis
Path(target).write_text(yaml.safe_dump(data))
EOF
  .venv/bin/thrifty serve --config "$STATE/replica-$i.yaml" --port $((8080 + i)) &
  PIDS+=($!)
done
echo "replicas on http://127.0.0.1:8081 .. :$((8080 + N)) sharing $REDIS_URL and $POSTGRES_URL"
echo "create a key: .venv/bin/thrifty keys create --tenant NAME --config $STATE/replica-1.yaml"
wait
