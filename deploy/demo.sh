#!/usr/bin/env bash
# Starts the local platform (edge relay + render node) and waits; Ctrl-C stops both.
# Usage: deploy/demo.sh BIN_DIR DATA_DIR RELAY_HTTP_ADDR
set -euo pipefail
bin=$1 data=$2 http=$3
logs="$data/logs"
mkdir -p "$logs"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$bin/pylon-relay" --http-addr "$http" --data-dir "$data/relay" >"$logs/relay.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  [ -s "$data/relay/relay-cert.der" ] && curl -fs "http://$http/healthz" >/dev/null 2>&1 && break
  kill -0 "${pids[0]}" 2>/dev/null || { echo "the relay failed to start:"; tail -20 "$logs/relay.log"; exit 1; }
  sleep 0.1
done
"$bin/pylon-server" --relay-cert "$data/relay/relay-cert.der" >"$logs/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  grep -q "connected to the relay" "$logs/server.log" 2>/dev/null && break
  kill -0 "${pids[1]}" 2>/dev/null || { echo "the render node failed to start:"; tail -20 "$logs/server.log"; exit 1; }
  sleep 0.1
done
grep -E "Vulkan device|encoder probe" "$logs/server.log" | sed -E 's/^.*(INFO|WARN) //' || true
echo "Logs: $logs/relay.log, $logs/server.log; metrics: http://$http/metrics and http://127.0.0.1:9100/metrics"
echo "Open http://$http/ to play (Ctrl-C stops)"
wait -n "${pids[@]}"
echo "a component exited; see $logs"
