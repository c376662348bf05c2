#!/usr/bin/env bash
# Starts the local platform as a pool: the indexer (SQLite, the demo title, the catalog
# page), one edge relay and one render node that register with it. Ctrl-C stops all.
# Usage: deploy/demo.sh BIN_DIR DATA_DIR CATALOG_ADDR RELAY_HTTP_ADDR
set -euo pipefail
bin=$1 data=$2 catalog=$3 relay=$4
logs="$data/logs"
mkdir -p "$logs"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# wait_for NAME PID LOG CHECK...: polls CHECK for up to 30 s while the process lives.
wait_for() {
  local name=$1 pid=$2 log=$3; shift 3
  for _ in $(seq 300); do
    "$@" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || { echo "the $name failed to start:"; tail -20 "$log"; exit 1; }
    sleep 0.1
  done
  echo "the $name did not become ready in 30 s:"; tail -20 "$log"; exit 1
}

"$bin/pylon-indexer" --addr "$catalog" --data-dir "$data/indexer" --demo-title >"$logs/indexer.log" 2>&1 &
pids+=($!)
wait_for indexer "${pids[0]}" "$logs/indexer.log" curl -fs "http://$catalog/api/v1/titles"

"$bin/pylon-relay" --http-addr "$relay" --data-dir "$data/relay" --indexer "http://$catalog" \
  --relay-id relay-local >"$logs/relay.log" 2>&1 &
pids+=($!)
wait_for relay "${pids[1]}" "$logs/relay.log" test -s "$data/relay/relay-cert.der"

"$bin/pylon-server" --relay-cert "$data/relay/relay-cert.der" --data-dir "$data/node" --indexer "http://$catalog" \
  --node-id node-local >"$logs/server.log" 2>&1 &
pids+=($!)
wait_for "render node" "${pids[2]}" "$logs/server.log" grep -q "connected to the relay" "$logs/server.log"
# Ready to match once the relay has reported its RTT to the node (heartbeats every 3 s).
wait_for relay "${pids[1]}" "$logs/relay.log" bash -c "curl -fs http://$catalog/api/v1/relays | grep -q node-local"

grep -E "Vulkan device|encoder probe" "$logs/server.log" | sed -E 's/^.*(INFO|WARN) //' || true
echo "Logs: $logs/{indexer,relay,server}.log"
echo "Metrics: http://$catalog/metrics, http://$relay/metrics, http://127.0.0.1:9100/metrics; API: http://$catalog/api/v1/openapi.json"
echo "Open http://$catalog/ to play (or http://$catalog/play/demo to start at once; Ctrl-C stops)"
wait -n "${pids[@]}"
echo "a component exited; see $logs"
