#!/usr/bin/env bash
# Full-size BAGEL-7B-MoT (random weights) through both real services on this machine's GPUs.
# Usage (on the GPU machine, repo root, `.whl` carried as for benchmarks/gpu_session.sh):
#   benchmarks/e2e_full_size.sh OUT_DIR
# 1. writes the 7b checkpoint (~29 GB, `python -m bagel.testing.tiny --preset 7b`) to $CKPT, unless one
#    is there already;
# 2. runs benchmarks.e2e_service at 1024², 50 timesteps, $REQUESTS requests per run (the first
#    apart): bf16 on 1 GPU, and with 2 GPUs visible also Ulysses 2, Ring 2, CFG 2, KV gather 2;
#    then fp8 on 1 GPU (and KV gather 2) when the diffusion service has --linear-precision and
#    the GPU has FP8 tensor cores;
#    then image editing (`--edit 1024`: a 1024x1024 input, three contexts of ~9,000 tokens) in
#    bf16 on 1 GPU, and with 2 GPUs CFG 2 and KV gather 2 (EDIT_TOPOLOGIES);
# 3. leaves at most 8 files in OUT_DIR: setup.txt (GPUs, checkpoint), e2e_bf16.{txt,json},
#    e2e_fp8.{txt,json}, e2e_edit.{txt,json}, logs.tar.gz (service logs). Draw the chart here
#    afterwards: python -m benchmarks.chart --e2e OUT_DIR/e2e_bf16.json OUT_DIR/e2e_fp8.json
# Expected (estimates, not yet measured on a GPU): checkpoint 0.5-3 min (writing 29.2 GB is the
# bound: 3.1 min at 0.17 GB/s on the 2-core CI VM, 6.9 GiB peak RSS); prefill load ~20 s per benchmark
# call; a run ~65 s on 1 GPU (service start ~20 s, first request ~25 s with CUDA-graph capture,
# two warm requests ~19 s), ~55 s on 2 GPUs. One H200: ~4 min. Two: ~8 min.
# Knobs: CKPT (default /dev/shm/bagel-7b-random when 40 GiB are free there, else
# /tmp/bagel-7b-random), REQUESTS (3), TOPOLOGIES and FP8_TOPOLOGIES
# ('|'-separated diffusion flags, '' is 1 GPU), EDIT_TOPOLOGIES, PASSES ("bf16 fp8 edit"), COMPARE=1 (PSNR against
# the in-process pipeline, after the services stop: +~1 min), GEN_DEVICE (cuda), BUDGET_S (560).
set -uo pipefail
out=${1:?out dir}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
python3 -c "import grpc, grpc_health, grpc_reflection, google_crc32c, prometheus_client" || {
  echo "missing Python packages: carry .whl with grpcio, grpcio-health-checking, grpcio-reflection, google-crc32c, protobuf"
  exit 2
}
budget=${BUDGET_S:-560}
setup=$out/setup.txt
nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv | tee "$setup"
gpus=$(nvidia-smi -L | wc -l)

free_gib() {
  local kib
  kib=$(df -Pk "$1" 2>/dev/null | awk 'NR==2 {print $4}')
  echo $(( ${kib:-0} / 1048576 ))
}
if [ -n "${CKPT:-}" ]; then
  ckpt=$CKPT
elif [ -f /dev/shm/bagel-7b-random/ema.safetensors ] || [ "$(free_gib /dev/shm)" -ge 40 ]; then
  ckpt=/dev/shm/bagel-7b-random  # memory: no disk to wait for, and the services read it at once
else
  ckpt=/tmp/bagel-7b-random
fi
if [ ! -f "$ckpt/ema.safetensors" ]; then
  mkdir -p "$ckpt"
  free_gb=$(free_gib "$ckpt")
  if [ "$free_gb" -lt 31 ]; then
    echo "only $free_gb GiB free at $ckpt; the checkpoint needs ~29.4 GB: set CKPT" | tee -a "$setup"
    exit 2
  fi
  start=$SECONDS
  python3 -m bagel.testing.tiny "$ckpt" --preset 7b --device "${GEN_DEVICE:-cuda}" 2>&1 | tee -a "$setup"
  [ -f "$ckpt/ema.safetensors" ] || exit 1
  echo "checkpoint written in $((SECONDS - start)) s" | tee -a "$setup"
else
  echo "reusing $ckpt" | tee -a "$setup"
fi
du -sh "$ckpt" | tee -a "$setup"

if [ "$gpus" -ge 2 ]; then
  all='|--ulysses 2|--ring 2|--cfg-parallel 2|--kv-gather 2'
  fp8_default='|--kv-gather 2'
  edit_default='|--cfg-parallel 2|--kv-gather 2'
else
  all=''
  fp8_default=''
  edit_default=''
fi
IFS='|' read -r -a topologies <<< "${TOPOLOGIES-$all}"
IFS='|' read -r -a fp8_topologies <<< "${FP8_TOPOLOGIES-$fp8_default}"
IFS='|' read -r -a edit_topologies <<< "${EDIT_TOPOLOGIES-$edit_default}"
[ ${#topologies[@]} -gt 0 ] || topologies=("")
[ ${#fp8_topologies[@]} -gt 0 ] || fp8_topologies=("")
[ ${#edit_topologies[@]} -gt 0 ] || edit_topologies=("")

# The precision flag only where the diffusion service has it; fp8 only on sm_89 and later.
has_flag=0
python3 -m diffusion_service --help | grep -q -- --linear-precision && has_flag=1
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)
fp8_ok=$(python3 -c "print(int($has_flag and float('$cap') >= 8.9))")

logs=/tmp/e2e-full-size-logs
rm -rf "$logs"
run() {  # NAME PRECISION [--edit SIZE] TOPOLOGY...
  local name=$1 precision=$2 left task=()
  shift 2
  if [ "${1:-}" = --edit ]; then task=(--edit "$2"); shift 2; fi
  left=$((budget - SECONDS - 20))
  if [ "$left" -lt 120 ]; then  # a prefill load and one run
    echo "skipping $name: ${left} s of the ${budget} s budget left" | tee "$out/e2e_$name.txt"
    return
  fi
  local flags=()
  [ "$has_flag" = 1 ] && flags=(--linear-precision "$precision")
  timeout -k 30 "$left" python3 -m benchmarks.e2e_service --model "$ckpt" --device cuda \
    --size 1024 --steps 50 --requests "${REQUESTS:-3}" --topologies "$@" "${flags[@]}" \
    "${task[@]}" ${COMPARE:+--compare} --logs "$logs/$name" --json "$out/e2e_$name.json" \
    2>&1 | tee "$out/e2e_$name.txt"
}
for pass in ${PASSES:-bf16 fp8 edit}; do
  case $pass in
    bf16) run bf16 bf16 "${topologies[@]}" ;;
    edit) COMPARE='' run edit bf16 --edit 1024 "${edit_topologies[@]}" ;;
    fp8)
      if [ "$fp8_ok" = 1 ]; then
        run fp8 fp8 "${fp8_topologies[@]}"
      else
        echo "fp8 skipped: --linear-precision flag $has_flag, compute capability $cap" | tee "$out/e2e_fp8.txt"
      fi
      ;;
  esac
done
tar -czf "$out/logs.tar.gz" -C "$logs" --exclude='*.png' . 2>/dev/null
echo "done in $SECONDS s"
