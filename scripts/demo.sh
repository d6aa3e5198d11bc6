#!/usr/bin/env bash
# make demo: the trained tiny checkpoint -> diffusion service -> prefill service -> client -> out/demo.png,
# then one edit of it -> out/demo_edit.png, judged by examples/tiny_shapes/check.py.
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
EDIT=${EDIT:-make the circle blue}
# The tiny shapes checkpoint's input sizes (examples/tiny_shapes/edit_inputs.py): the VAE at its
# native 128x128, the ViT at 112x112; the reference's rules would enlarge a 128x128 input to 512.
EDIT_RESIZE=${EDIT_RESIZE:---edit-vae-resize 128,128 --edit-vit-resize 112,112}
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
# shellcheck disable=SC2086
"$PY" -m prefill_service --model "$MODEL" --listen "$PREFILL" --diffusion "$DIFFUSION" $EDIT_RESIZE \
  >out/prefill.log 2>&1 &
pids+=($!)
wait_serving "$DIFFUSION" out/diffusion.log
wait_serving "$PREFILL" out/prefill.log
"$PY" -m client generate "$PROMPT" -o out/demo.png \
  --size "$SIZE" --steps 50 --seed 52 --server "$PREFILL"
"$PY" -m client edit out/demo.png "$EDIT" -o out/demo_edit.png --steps 50 --seed 7 --server "$PREFILL"
"$PY" -m examples.tiny_shapes.check out/demo.png out/demo_edit.png "$EDIT"
echo "the edit of out/demo.png (\"$EDIT\") was written to out/demo_edit.png"
echo "service logs: out/diffusion.log out/prefill.log"
