#!/bin/bash
# Cluster mode against embedded mode in one session (docs/benchmarks.md, "Cluster mode"):
# the same `barrage loadtest fanout` against `barrage up` (embedded, one process), then
# `barrage cluster --brokers 1 --edges 1` on one NATS server (stream R1) and on three (R3).
# Usage: scripts/cluster-bench.sh [embedded|r1|r3 ...]   (default: all three, in that order)
# Env: BIN (default target/release/barrage), RATES (default 1000,4000,8000), VIEWERS (200),
# ROOMS (10), STEP_MS (8000). Binds 127.0.0.1:11197 and :10517 for `up` (--ports-offset 3117);
# the cluster picks free ports.
set -u
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/barrage}
K=benchkey-0123456789abcdef0123456789abcdef
RATES=${RATES:-1000,4000,8000}
VIEWERS=${VIEWERS:-200}
ROOMS=${ROOMS:-10}
STEP_MS=${STEP_MS:-8000}
MODES=${*:-embedded r1 r3}
LOG=$(mktemp -d)

load() { # $1 control URL, $2 ingest address
  "$BIN" loadtest fanout --control "$1" --control-key "$K" --ingest "$2" --api-key "$K" \
    --viewers "$VIEWERS" --rooms "$ROOMS" --rates "$RATES" --step-ms "$STEP_MS" --warmup-ms 2000
}

wait_line() { # waits for the first line of $1
  for _ in $(seq 1 600); do [ -s "$1" ] && return 0; sleep 0.1; done
  echo "no JSON line in $1" >&2; return 1
}

for mode in $MODES; do
  echo "=== $mode ($(date -u +%H:%M:%S), load average $(cut -d' ' -f1-3 /proc/loadavg))"
  case $mode in
    embedded)
      "$BIN" up --api-key "$K" --ports-offset 3117 --no-demo >"$LOG/up.out" 2>"$LOG/up.err" &
      pid=$!
      for _ in $(seq 1 300); do
        curl -sf http://127.0.0.1:11197/healthz >/dev/null && break; sleep 0.1
      done
      load http://127.0.0.1:11197 127.0.0.1:10517
      ;;
    r1|r3)
      n=1; [ "$mode" = r3 ] && n=3
      "$BIN" cluster --nats $n --brokers 1 --edges 1 --json --api-key "$K" \
        >"$LOG/$mode.json" 2>"$LOG/$mode.err" &
      pid=$!
      wait_line "$LOG/$mode.json" || { kill "$pid"; continue; }
      read -r control ingest < <(python3 -c '
import json,sys
r=json.load(open(sys.argv[1]))["regions"][0]
print(r["control"], r["brokers"][0]["ingest"])' "$LOG/$mode.json")
      load "$control" "$ingest"
      ;;
    *) echo "unknown mode $mode" >&2; continue ;;
  esac
  kill -TERM "$pid"; wait "$pid" 2>/dev/null
done
rm -rf "$LOG"
