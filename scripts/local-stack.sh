# Sourced by the benchmark scripts (hotroom.sh, presence-churn.sh): writes control.toml,
# broker.toml and edge.toml in the current directory for one control, one single-shard broker
# and one single-shard edge on fixed loopback ports, and starts them from $BIN.
#   start_stack EDGE_DRIVER BROKER_SCOPES [EXTRA_EDGE_LINE...]
# sets CP, BP, EP (the three pids), S (the token secret) and K (the API key).
S=6f1d2c3b4a5968778695a4b3c2d1e0f0112233445566778899aabbccddeeff00
K=loadtest-api-key-0123456789abcdef0123456789abcdef
start_stack() {
  local driver=$1 scopes=$2
  shift 2
  cat > control.toml <<T
http_addr = "127.0.0.1:18080"
api_keys = ["$K"]
token_keys = "1:$S"
driver = "legacy"
[http]
conns_per_addr_max = 4096
conns_max = 8192
T
  cat > broker.toml <<T
shards = 1
pin = false
driver = "legacy"
ingest_addr = "127.0.0.1:17400"
link_addr = "127.0.0.1:17401"
http_addr = "127.0.0.1:17480"
[[api_keys]]
key = "$K"
scopes = $scopes
T
  cat > edge.toml <<T
shards = 1
pin = false
driver = "$driver"
node_id = "bench-e1"
tcp_addr = "127.0.0.1:17000"
ws_addr = "127.0.0.1:17001"
admin_addr = "127.0.0.1:17002"
public_host = "127.0.0.1"
broker_addrs = ["127.0.0.1:17401"]
control_addr = "127.0.0.1:18080"
token_keys = "1:$S"
T
  local line
  for line in "$@"; do echo "$line" >> edge.toml; done
  $BIN control --config control.toml > c.log 2>&1 & CP=$!
  $BIN broker --config broker.toml > b.log 2>&1 & BP=$!
  sleep 1
  $BIN edge --config edge.toml > e.log 2>&1 & EP=$!
  sleep 3
}
