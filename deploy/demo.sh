#!/usr/bin/env bash
# Starts the local platform as a pool: the indexer (SQLite, the demo title and the studio
# titles in deploy/titles/, the catalog page), one edge relay and one render node that
# register with it. Ctrl-C stops all.
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

# The operator's token: made once, kept in the data directory (mode 0600).
mkdir -p "$data/indexer"
token_file="$data/indexer/admin-token"
[ -s "$token_file" ] || (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$token_file")
"$bin/pylon-indexer" --addr "$catalog" --data-dir "$data/indexer" --demo-title --admin-token-file "$token_file" \
  >"$logs/indexer.log" 2>&1 &
pids+=($!)
wait_for indexer "${pids[0]}" "$logs/indexer.log" curl -fs "http://$catalog/api/v1/titles"
# Studio titles: each launch spec in deploy/titles/ is deployed as a studio would.
here=$(cd "$(dirname "$0")" && pwd)
for spec in "$here"/titles/*.json; do
  [ -e "$spec" ] || continue
  curl -fsS -X POST -H "authorization: Bearer $(cat "$token_file")" -H 'content-type: application/json' \
    --data-binary @"$spec" "http://$catalog/api/v1/titles" >/dev/null \
    || { echo "could not deploy the title $spec"; exit 1; }
  echo "Deployed title $(basename "$spec" .json)"
done

"$bin/pylon-relay" --http-addr "$relay" --data-dir "$data/relay" --indexer "http://$catalog" \
  --relay-id relay-local >"$logs/relay.log" 2>&1 &
pids+=($!)
wait_for relay "${pids[1]}" "$logs/relay.log" test -s "$data/relay/relay-cert.der"

# In the pool the node trusts the relay by the certificate it registered: no file to copy.
"$bin/pylon-server" --data-dir "$data/node" --indexer "http://$catalog" \
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
