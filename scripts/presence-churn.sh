#!/bin/bash
# Presence cost under churn (docs/benchmarks.md): run from a scratch directory; it writes
# config files and logs there and binds 127.0.0.1:17000-17480 and :18080.
# Usage: presence-churn.sh on|off  -> churn with the edge's presence on or off; prints the loadtest
# summary and the edge's CPU seconds over the run. SCENARIO=fanout (what presence-fanout.sh sets)
# runs a fan-out instead: VIEWERS viewers in one room, a publish step at RATE msgs/s for DUR s.
set -u
MODE=$1
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/barrage}
PRES=true; [ "$MODE" = off ] && PRES=false
. "$(dirname "$0")/local-stack.sh"
start_stack legacy '["room", "presence"]' "presence = $PRES"
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
T0=$(cpu $EP); B0=$(cpu $BP)
if [ "${SCENARIO:-churn}" = fanout ]; then
$BIN loadtest fanout --control http://127.0.0.1:18080 --control-key $K --api-key $K \
  --broker-http 127.0.0.1:17480 --ingest 127.0.0.1:17400 --viewers ${VIEWERS:-2000} --rooms 1 \
  --rates ${RATE:-200} --step-ms $(( ${DUR:-10} * 1000 )) --warmup-ms 2000 --ramp-per-s 2000 --pids $EP --json fanout-$MODE.json 2>&1 | tail -15
else
$BIN loadtest churn --control http://127.0.0.1:18080 --control-key $K --api-key $K \
  --broker-http 127.0.0.1:17480 --ingest 127.0.0.1:17400 --connects-per-s ${RATE:-500} --hold-ms 1000 \
  --duration-ms ${DUR_MS:-10000} --warmup-ms 0 --sources 127.0.0.2,127.0.0.3 --json churn-$MODE.json 2>&1 | tail -15
fi
T1=$(cpu $EP); B1=$(cpu $BP)
TCK=$(getconf CLK_TCK)
echo "edge_cpu_s=$(echo "($T1-$T0)/$TCK" | bc -l) broker_cpu_s=$(echo "($B1-$B0)/$TCK" | bc -l)"
[ "${SCENARIO:-churn}" = fanout ] && exit 0
sleep 2.5
curl -s -H "Authorization: Bearer $K" http://127.0.0.1:17480/v1/presence/room/1000 ; echo
curl -s http://127.0.0.1:17002/metrics | grep -E "^barrage_edge_connections|^barrage_edge_presence_records"
curl -s http://127.0.0.1:17480/metrics | grep -E "^barrage_broker_presence_(records|frames_total|duplicate|unknown)"
kill $EP $BP $CP; wait 2>/dev/null
