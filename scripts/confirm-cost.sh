#!/bin/bash
# What edge confirmations cost (docs/benchmarks.md, "Edge confirmations"): the same many-rooms
# load through `barrage up` (embedded: no confirmations by construction) and through
# `barrage cluster --brokers 1 --edges 1` (cluster mode: every batch confirmed), with the binary
# BIN. Run it with a build that has confirmations and one that has not (BIN=... each) in the same
# session and compare the loadtest summaries: server CPU s per million deliveries, p50/p99, missing.
# Usage: BIN=target/release/barrage scripts/confirm-cost.sh embedded|cluster [label]
# Binds 127.0.0.1 ports from `up --ports-offset 17000` (embedded) or free ones (cluster).
set -u
MODE=$1
LABEL=${2:-run}
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/barrage}
K=confirm-cost-api-key-0123456789abcdef0123456789ab
S=6f1d2c3b4a5968778695a4b3c2d1e0f0112233445566778899aabbccddeeff00
VIEWERS=${VIEWERS:-3000}
ROOMS=${ROOMS:-300}
RATE=${RATE:-400}
DUR=${DUR:-15000}
OUT=$(mktemp -d)
if [ "$MODE" = embedded ]; then
  "$BIN" up --api-key "$K" --token-secret "$S" --ports-offset 17000 --no-demo >"$OUT/up.log" 2>&1 &
  STACK=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:25080/readyz >/dev/null 2>&1 && break; sleep 0.2; done
  CONTROL=http://127.0.0.1:25080
  INGEST=127.0.0.1:24400
  PIDS=$STACK
else
  "$BIN" cluster --brokers 1 --edges 1 --partitions 16 --json --api-key "$K" --token-secret "$S" >"$OUT/cluster.json" 2>"$OUT/cluster.log" &
  STACK=$!
  for _ in $(seq 300); do [ -s "$OUT/cluster.json" ] && break; sleep 0.2; done
  read -r CONTROL INGEST PIDS HTTP < <(python3 -c '
import json,sys
r=json.loads(open(sys.argv[1]).readline())["regions"][0]
print(r["control"], r["brokers"][0]["ingest"], ",".join(str(p["pid"]) for p in r["brokers"]+r["edges"]), r["brokers"][0]["http"])' "$OUT/cluster.json")
fi
echo "$LABEL $MODE: control $CONTROL ingest $INGEST server pids $PIDS"
"$BIN" loadtest rooms --control "$CONTROL" --ingest "$INGEST" --api-key "$K" \
  --viewers "$VIEWERS" --rooms "$ROOMS" --zipf 1.1 --rate "$RATE" --ramp-per-s 3000 \
  --warmup-ms 3000 --duration-ms "$DUR" --ticket-per-room --pids "$PIDS" --json "$OUT/rooms.json" \
  2>&1 | tail -n 25
if [ "$MODE" = cluster ]; then
  # Link batches sent and CONFIRM frames received (0 without confirmations).
  curl -s "$HTTP/metrics" | grep -E '^barrage_broker_(link_batches_sent_total|backbone_confirms_total|backbone_acked_total) '
fi
kill -TERM "$STACK"
wait "$STACK" 2>/dev/null
echo "json: $OUT/rooms.json"
