#!/bin/bash
# Cluster mode against embedded mode in one session (docs/benchmarks.md, "Cluster mode"):
# the same `barrage loadtest fanout` against `barrage up` (embedded, one process), then
# `barrage cluster --brokers BROKERS --edges EDGES` on one NATS server (stream R1) and on three (R3).
# Usage: scripts/cluster-bench.sh [embedded|r1|r3 ...]   (default: all three, in that order)
# Env: BIN (default target/release/barrage), RATES (default 500,1000,2000), VIEWERS (200),
# ROOMS (10), STEP_MS (8000). SCENARIO=rooms runs `loadtest rooms` instead: RATE (default 8000)
# pushes/s for DURATION_MS (10000), the accepted-rate run; the brokers' per-room rate limit
# (2,000/s, which the publisher's hot room would hit) is off in both modes; one API key still
# allows 10,000/s. SCENARIO=reach runs `loadtest reach` (VIEWERS users, REACH success
# probability, default 0.9, RATE_REACH pushes/s, default 500). BROKERS and EDGES (default 1) size the
# cluster; its viewers connect where control sends them and the load publishes to broker-1.
# Binds 127.0.0.1:11197 and :10517 for `up` (--ports-offset 3117); the cluster picks free ports.
set -u
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/barrage}
K=benchkey-0123456789abcdef0123456789abcdef
RATES=${RATES:-500,1000,2000}
SCENARIO=${SCENARIO:-fanout}
RATE=${RATE:-8000}; [ "$SCENARIO" = reach ] && RATE=${RATE_REACH:-500}
DURATION_MS=${DURATION_MS:-10000}
REACH=${REACH:-0.9}
BROKERS=${BROKERS:-1}
EDGES=${EDGES:-1}
ROOM_RATE=2000.0; [ "$SCENARIO" = rooms ] && ROOM_RATE=0.0
VIEWERS=${VIEWERS:-200}
ROOMS=${ROOMS:-10}
STEP_MS=${STEP_MS:-8000}
MODES=${*:-embedded r1 r3}
LOG=$(mktemp -d)

load() { # $1 control URL, $2 ingest address
  if [ "$SCENARIO" = reach ]; then
    "$BIN" loadtest reach --control "$1" --control-key "$K" --ingest "$2" --api-key "$K" \
      --viewers "$VIEWERS" --reach-success "$REACH" --rate "$RATE"
    return
  fi
  if [ "$SCENARIO" = rooms ]; then
    "$BIN" loadtest rooms --control "$1" --control-key "$K" --ingest "$2" --api-key "$K" \
      --viewers "$VIEWERS" --rooms "$ROOMS" --rate "$RATE" --publish-uniform \
      --duration-ms "$DURATION_MS" --warmup-ms 2000
    return
  fi
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
      printf '[broker]\nroom_rate_per_s = %s\n' "$ROOM_RATE" >"$LOG/up.toml"
      "$BIN" up --config "$LOG/up.toml" --api-key "$K" --ports-offset 3117 --no-demo \
        >"$LOG/up.out" 2>"$LOG/up.err" &
      pid=$!
      for _ in $(seq 1 300); do
        curl -sf http://127.0.0.1:11197/healthz >/dev/null && break; sleep 0.1
      done
      load http://127.0.0.1:11197 127.0.0.1:10517
      ;;
    r1|r3)
      n=1; [ "$mode" = r3 ] && n=3
      "$BIN" cluster --nats $n --brokers "$BROKERS" --edges "$EDGES" --json --api-key "$K" \
        --broker-set "room_rate_per_s=$ROOM_RATE" \
        >"$LOG/$mode.json" 2>"$LOG/$mode.err" &
      pid=$!
      wait_line "$LOG/$mode.json" || { grep -v WARN "$LOG/$mode.err" | tail -5; kill "$pid"; continue; }
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
