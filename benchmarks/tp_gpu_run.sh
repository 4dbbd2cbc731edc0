#!/usr/bin/env bash
# Issue 8's device run, from the repo root on a host with 2 (or 4) GPUs: the GPU tests (Triton kernels,
# CUDA graphs, tp 2 == tp 1 with the symmetric-memory all-reduce), tp_bench's variants, and a
# `profiler sweep` over the tp sizes. OUT=dir TP=1,2 bash benchmarks/tp_gpu_run.sh
# (a host without pydantic/pytest: `pip download -d build/gpuwheels --only-binary=:all: --python-version 3.12
# pydantic pytest pyyaml tqdm` on a machine with network access, and carry build/gpuwheels).
set -uo pipefail
OUT="${OUT:-runs/tp}"
TP="${TP:-1,2}"
mkdir -p "$OUT"
export PYTHONPATH=. NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 SPECPLAN_TP_TIMEOUT_S=120
python3 -c "import pydantic, pytest, yaml, tqdm" 2>/dev/null ||
    python3 -m pip install -q --no-index --find-links build/gpuwheels pydantic pytest pyyaml tqdm
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'triton', triton.__version__)"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout "${TEST_LIMIT_S:-200}" python3 -m pytest -q -x -p no:cacheprovider tests/engine/gpu 2>&1 | tail -15
fi
max_tp=$(echo "$TP" | tr ',' '\n' | sort -n | tail -1)
timeout 120 python3 benchmarks/allreduce_bench.py --world "$max_tp" --tokens 1,8,64 2>&1 | grep -v Warning | tail -8
variants="1/unfused,1"
for t in ${TP//,/ }; do
    [ "$t" -gt 1 ] && variants="$variants,$t,$t/oneshot,$t/none"
done
timeout "${BENCH_LIMIT_S:-240}" python3 benchmarks/tp_bench.py --model vicuna-7b --dtype float16 \
    --variants "${VARIANTS:-$variants}" --batch 1,8,64 --context 1024 --steps 30 --warmup 5 \
    --json "$OUT/tp_bench.json" 2>&1 | tee "$OUT/tp_bench.txt" | grep -v "ready in\|closed in" | tail -40
if [ "${SKIP_SWEEP:-0}" != 1 ]; then
    t0=$(date +%s)
    timeout "${SWEEP_LIMIT_S:-200}" python3 -m profiler.cli sweep --model vicuna-7b --tp "$TP" \
        --method none,ngram --k 0,4 --concurrency 1,4,16,64 --context 512,2048 \
        --out "$OUT/profile.json" --no-progress --no-plots > "$OUT/sweep.log" 2>&1
    echo "sweep rc=$? in $(($(date +%s) - t0)) s"; tail -5 "$OUT/sweep.log"
fi
