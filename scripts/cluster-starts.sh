#!/bin/bash
# Starts `barrage cluster --nats 3 --brokers 2 --edges 1 --json` N times in a row, each until it
# prints its JSON line (or exits, or 90 s pass), then stops it with SIGTERM; LOAD busy loops run
# beside it for the whole run (docs/benchmarks.md, "`barrage cluster --nats 3` starts under load").
# Prints one line per start (ok / exit / timeout, seconds to the JSON line) and a summary; the
# stderr of each start is kept in OUT/err.<i>.
# Usage: scripts/cluster-starts.sh [N] [LOAD] [OUT]   Env: BIN (default target/debug/barrage).
set -u
N=${1:-15}
LOAD=${2:-3}
OUT=${3:-$(mktemp -d)}
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/debug/barrage}
mkdir -p "$OUT"
busy=()
for _ in $(seq 1 "$LOAD"); do
  timeout 900 sh -c 'while :; do :; done' &
  busy+=($!)
done
ok=0
times=()
for i in $(seq 1 "$N"); do
  t0=$(date +%s.%N)
  "$BIN" cluster --nats 3 --brokers 2 --edges 1 --json >"$OUT/out.$i" 2>"$OUT/err.$i" &
  pid=$!
  res=timeout
  for _ in $(seq 1 900); do
    if [ -s "$OUT/out.$i" ]; then res=ok; break; fi
    if ! kill -0 "$pid" 2>/dev/null; then res=exit; break; fi
    sleep 0.1
  done
  t=$(echo "$(date +%s.%N) - $t0" | bc)
  kill -TERM "$pid" 2>/dev/null
  wait "$pid"
  printf 'start %d: %s %.1f s\n' "$i" "$res" "$t"
  [ "$res" = ok ] && ok=$((ok + 1))
  times+=("$t")
  sleep 1
done
for p in "${busy[@]}"; do kill "$p" 2>/dev/null; done
printf '%s\n' "${times[@]}" | sort -n | awk -v ok="$ok" -v n="$N" -v load="$LOAD" \
  '{t[NR]=$1} END {printf "%d of %d started, %d busy loops; seconds to the JSON line: median %.1f, max %.1f, over 8 s: ", ok, n, load, t[int((NR+1)/2)], t[NR]; s=0; for (i in t) if (t[i]>8) s++; print s}'
echo "stderr of each start in $OUT"
