#!/usr/bin/env bash
# One device call: the gpu-marked tests, then the full-size step-cache table on 2 GPUs.
# Usage (on the GPU machine, repo root): benchmarks/gpu_session.sh OUT_DIR [tests|bench|all]
set -uo pipefail
out=${1:?out dir}; what=${2:-all}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpus.txt"
if [ "$what" != bench ]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu -o addopts="" \
    $(find tests -name 'test_*_cuda.py' | sort) \
    2>&1 | tee "$out/gpu_tests.txt"
fi
if [ "$what" != tests ]; then
  caches="${CACHES:-dbcache:fn=4,bn=0,warmup=8,threshold=0.24;dbcache:fn=8,bn=0,warmup=8,threshold=0.24;dbcache:fn=4,bn=0,warmup=8,max_continuous=1,threshold=10;dbcache:fn=4,bn=0,warmup=8,max_continuous=1,threshold=10+taylorseer:order=2}"
  python3 -m benchmarks.sp_gpu --world 2 --size 1024 --steps 50 \
    --topologies "${TOPOLOGIES:-ulysses2,ring2,cfg2}" --caches "$caches" \
    --json "$out/sp_gpu_cache.json" 2>&1 | tee "$out/sp_gpu_cache.txt"
fi
