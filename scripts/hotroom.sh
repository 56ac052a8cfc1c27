#!/bin/bash
# The hot room (issue 14, docs/benchmarks.md "Hot room"): VIEWERS viewers (default 19,000) in one
# room on ONE edge shard, publish steps at RATES msg/s, release build. Run from a scratch
# directory: it writes config files and logs there and binds 127.0.0.1:17000-17480 and :18080.
# Usage: hotroom.sh [legacy|uring]   (the edge's driver; control and broker run on epoll)
# Env: BIN (barrage binary), VIEWERS, RATES (comma list), STEP_MS, SOURCES (loopback source
# addresses for the viewers' sockets). Prints the loadtest summary, then per step of the edge's
# own counters: sends, writes, batches per write, and the edge's and broker's CPU seconds.
set -u
DRIVER=${1:-legacy}
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/barrage}
VIEWERS=${VIEWERS:-19000}
RATES=${RATES:-5,10,20,50,100}
STEP_MS=${STEP_MS:-8000}
SOURCES=${SOURCES:-127.0.0.2,127.0.0.3,127.0.0.4}
. "$(dirname "$0")/local-stack.sh"
start_stack "$DRIVER" '["room"]'
# Per step: the edge's counters every STEP_MS, in the background, next to the loadtest's steps.
metric() { curl -s http://127.0.0.1:17002/metrics | awk -v m="$1" '$1 ~ "^"m {s+=$2} END {printf "%.0f", s}'; }
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
( while sleep 1; do echo "$(date +%s.%N) sends=$(metric barrage_edge_sends_total) writes=$(metric barrage_edge_writes_total) drops=$(metric barrage_edge_drops_total) edge_ticks=$(cpu $EP) broker_ticks=$(cpu $BP)"; done ) > counters.log 2>/dev/null & MP=$!
$BIN loadtest fanout --control http://127.0.0.1:18080 --control-key $K --api-key $K \
  --broker-http 127.0.0.1:17480 --ingest 127.0.0.1:17400 --viewers $VIEWERS --rooms 1 \
  --sources $SOURCES --rates $RATES --step-ms $STEP_MS --warmup-ms 3000 \
  --ramp-per-s ${RAMP:-2000} --p99-ms-max 600000 --pids $EP,$BP --json hotroom-$DRIVER.json 2>&1 | tail -25
kill $MP $EP $BP $CP; wait 2>/dev/null
# Per interval: sends/s, writes/s, batches per write, edge cores.
awk -v hz=$(getconf CLK_TCK) '{for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
  if (NR > 1 && v["writes"] > w) { dt = $1 - t; printf "t=%.0f sends/s=%.0f writes/s=%.0f batches/write=%.2f edge_cores=%.2f drops=%d\n",
    $1, (v["sends"] - s) / dt, (v["writes"] - w) / dt, (v["sends"] - s) / (v["writes"] - w), (v["edge_ticks"] - e) / hz / dt, v["drops"] }
  t = $1; s = v["sends"]; w = v["writes"]; e = v["edge_ticks"] }' counters.log
