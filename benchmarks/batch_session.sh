#!/usr/bin/env bash
# One device call for the batching decision and the time split: `benchmarks.batch_forward`
# (batches 1/2/4 at 512² and 1024², bf16 and FP8, and the per-kernel-group profiles), then a
# BAGEL-7B-shaped random checkpoint and `benchmarks.prefill_latency` over it.
# Usage (on the GPU machine, repo root, `.whl` carried as for benchmarks/gpu_session.sh):
#   benchmarks/batch_session.sh OUT_DIR
# Writes OUT_DIR/{gpus.txt, batch_forward.txt, batch_forward.json, prefill_latency.txt}.
# Knobs: WHL (the wheels' folder, default .whl), CKPT (default /dev/shm/bagel-7b-random when
# 40 GiB are free there, else /tmp/bagel-7b-random), BATCH_ARGS (extra batch_forward flags).
set -uo pipefail
out=${1:?out dir}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
whl=${WHL:-.whl}
if [ -d "$whl" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$whl"/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpus.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$out/gpus.txt"
start=$SECONDS
# shellcheck disable=SC2086  # BATCH_ARGS is a list of flags
timeout -k 10 300 python3 -m benchmarks.batch_forward --json "$out/batch_forward.json" ${BATCH_ARGS:-} \
  2>&1 | tee "$out/batch_forward.txt"
echo "batch_forward: $((SECONDS - start)) s" | tee -a "$out/gpus.txt"

free_kib=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
if [ -z "${CKPT:-}" ]; then
  if [ "${free_kib:-0}" -ge $((40 * 1048576)) ]; then CKPT=/dev/shm/bagel-7b-random
  else CKPT=/tmp/bagel-7b-random; fi
fi
start=$SECONDS
[ -f "$CKPT/ema.safetensors" ] || timeout -k 10 150 python3 -m bagel.testing.tiny "$CKPT" --preset 7b --device cuda \
  2>&1 | tail -3 | tee -a "$out/gpus.txt"
echo "checkpoint: $((SECONDS - start)) s" | tee -a "$out/gpus.txt"
timeout -k 10 120 python3 -m benchmarks.prefill_latency --model "$CKPT" --device cuda 2>&1 \
  | tee "$out/prefill_latency.txt"
echo "done in $SECONDS s" | tee -a "$out/gpus.txt"
