#!/usr/bin/env bash
# Device calls for the GPU round, one or more parts in order:
#   tests     every *_cuda.py test
#   decode    text-decoding speed and its per-kernel profile (BAGEL-7B shapes)
#   fp8       the FP8 attention kernel against cuDNN
#   chat      a BAGEL-7B-shaped random checkpoint, then chat through the prefill service
#   services  the checkpoint, the prefill latency rows, chat, and both services at 1024² on one
#             GPU: default, --preset fast, and the allocator's default for comparison
#   kernels   tests, decode and fp8;  all: kernels and services
# Usage (on the GPU machine, repo root, `.whl` carried as for benchmarks/gpu_session.sh):
#   benchmarks/round3_session.sh OUT_DIR PART...
# Each step has its own time limit; a step that would start with less than its limit left in
# BUDGET_S (560) is skipped with a line saying so. Knobs: CKPT (default /dev/shm/bagel-7b-random).
set -uo pipefail
out=${1:?out dir}; shift
[ $# -gt 0 ] || { echo "name a part: tests decode fp8 chat services kernels all"; exit 2; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
budget=${BUDGET_S:-560}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpus.txt"

step() {  # NAME LIMIT_S COMMAND...: run with a limit, output to OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  if [ $((budget - SECONDS)) -lt "$limit" ]; then
    echo "skipped $name: $((budget - SECONDS)) s left, it may take $limit" | tee -a "$out/gpus.txt"
    return
  fi
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" >"$out/$name.txt" 2>&1
  echo "$name: rc $? in $((SECONDS - start)) s" | tee -a "$out/gpus.txt"
  tail -25 "$out/$name.txt"
}

tests() {
  # shellcheck disable=SC2046  # one argument per test file
  step gpu_tests 220 python3 -m pytest -q -p no:cacheprovider -m gpu -o addopts="" \
    $(find tests -name 'test_*_cuda.py' | sort)
}
decode() {
  step decode 150 python3 -m benchmarks.decode --preset 7b --device cuda --new-tokens 64 \
    --no-transformers
  step decode_profile 110 python3 -m benchmarks.decode_profile --preset 7b --batches 1,8
}
fp8() {
  step fp8_attention 60 python3 -m benchmarks.fp8_attention
}
ckpt=${CKPT:-/dev/shm/bagel-7b-random}
checkpoint() {
  [ -f "$ckpt/ema.safetensors" ] || step checkpoint 100 python3 -m bagel.testing.tiny "$ckpt" \
    --preset 7b --device cuda
}
chat() {
  checkpoint
  step chat_service 110 python3 -m benchmarks.chat_service --model "$ckpt" --device cuda \
    --clients 1,8 --new-tokens 64
}
services() {
  checkpoint
  step prefill_latency 90 python3 -m benchmarks.prefill_latency --model "$ckpt" --device cuda
  chat
  step e2e 300 python3 -m benchmarks.e2e_service --model "$ckpt" --device cuda --size 1024 \
    --steps 50 --requests 3 --topologies "" "--preset fast" "--cuda-allocator default" \
    --json "$out/e2e.json" --logs /tmp/e2e-logs
}
for part in "$@"; do
  case $part in
    tests | decode | fp8 | chat | services) $part ;;
    kernels) tests; decode; fp8 ;;
    all) tests; decode; fp8; services ;;
    *) echo "unknown part $part: tests decode fp8 chat services kernels all"; exit 2 ;;
  esac
done
echo "done in $SECONDS s" | tee -a "$out/gpus.txt"
