set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
timeout 130 python3 -m benchmarks.sp_gpu --world 2 --size 1024 --steps 50 --topologies ulysses2,ring2,cfg2,kvgather2 --json $OUT/sp_gpu.json > $OUT/sp_gpu.txt 2>&1
grep -v "^{" $OUT/sp_gpu.txt | tail -12
