#!/usr/bin/env bash
# make demo: the trained tiny checkpoint -> diffusion service -> prefill service -> client -> out/demo.png.
# Both services are stopped on success, failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-examples/tiny_shapes/checkpoint}
PROMPT=${PROMPT:-a red circle on a white background}
SIZE=${SIZE:-128}
DIFFUSION=${DIFFUSION:-127.0.0.1:50062}
PREFILL=${PREFILL:-127.0.0.1:50061}
TOPOLOGY=${TOPOLOGY:---ulysses 2}
mkdir -p out
pids=()
stop() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop EXIT INT TERM

wait_serving() {  # address, log file
  for _ in $(seq 1 300); do
    if "$PY" -m client health --server "$1" --timeout 1 >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "service at $1 did not become SERVING; its log:" >&2
  cat "$2" >&2
  return 1
}

# shellcheck disable=SC2086
"$PY" -m diffusion_service --model "$MODEL" --listen "$DIFFUSION" $TOPOLOGY >out/diffusion.log 2>&1 &
pids+=($!)
"$PY" -m prefill_service --model "$MODEL" --listen "$PREFILL" --diffusion "$DIFFUSION" >out/prefill.log 2>&1 &
pids+=($!)
wait_serving "$DIFFUSION" out/diffusion.log
wait_serving "$PREFILL" out/prefill.log
"$PY" -m client generate "$PROMPT" -o out/demo.png \
  --size "$SIZE" --steps 50 --seed 52 --server "$PREFILL"
echo "service logs: out/diffusion.log out/prefill.log"
