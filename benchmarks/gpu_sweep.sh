#!/usr/bin/env bash
# The default GPU sweep (configs/sweeps/default.yaml, section gpu: vicuna-7b, tp 1, none/ngram/draft,
# k 0..5, concurrency 1..128, context 512 and 2048, speculative points at draft coverage 0.5 and 1, 2-4
# repeats of 6 whole engine steps per point) timed end to end (target: SWEEP_WALL_S <= 120), then
# `profiler show` (flagged points, step phases) and `profiler validate` on it.
# Run on a GPU host from the repo root: OUT=dir bash benchmarks/gpu_sweep.sh
# (pydantic wheels for a host without it: .whl/, filled as benchmarks/validate_gpu.sh's header says).
set -uo pipefail
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
export PYTHONPATH=. NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -c "import pydantic" 2>/dev/null || python3 -m pip install -q --no-index --find-links .whl pydantic
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
PROFILE="$OUT/vicuna7b.json"
t0=$(date +%s.%N)
timeout "${SWEEP_LIMIT_S:-450}" python3 -m profiler.cli sweep --out "$PROFILE" --no-progress 2>&1 | tee "$OUT/sweep.log" | tail -80
t1=$(date +%s.%N)
echo "SWEEP_WALL_S $(python3 -c "print(round($t1 - $t0, 1))")"
python3 -m profiler.cli show "$PROFILE" > "$OUT/show.txt" 2>&1
grep -A40 "^flagged decode points" "$OUT/show.txt" | head -40
if [ -f profiler/validate.py ]; then
    timeout "${VALIDATE_LIMIT_S:-100}" python3 -m profiler.cli validate "$PROFILE" --points 4 2>&1 | tee "$OUT/validate.txt" | tail -30
fi
ls -la "$OUT" "$OUT"/*plots* 2>/dev/null
