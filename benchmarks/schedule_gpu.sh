#!/usr/bin/env bash
# The k schedule measured end to end on a GPU (issue 14): a none + ngram sweep of vicuna-7b with random
# weights (k 0..5, concurrency 1..128, context 256 and 1024), then benchmarks/schedule_serve_bench.py:
# the planner's schedule, each fixed k in FIXED_K and no speculation, each through its own `engine
# serve` at the controlled acceptance CONTROLLED (the schedule is planned at the same acceptance),
# goodput per concurrency at the ITL SLA.
# From the repo root on the GPU host:   OUT=runs/schedule_gpu bash benchmarks/schedule_gpu.sh
# Knobs: SLA_MS (default 20), CONC (default 1,2,4,8,16,32,64,128), FIXED_K (default 2,4: two servers
# of fixed k; issue 14's target compares with every fixed k, FIXED_K=1,2,3,4,5, seven servers), CONTROLLED
# (default alpha=0.7,coverage=0.8), ISL (default 384), OSL (default 64), PROFILE (skip the sweep), RESUME=1
# (keep the configs $OUT/schedule.json already holds, run the rest), REPEATS (measurements of every
# concurrency per server, default 1; the median is kept), WAVES (closed-loop rounds per
# point, default 4; seven servers at 4 take two calls of 600 s: the second with RESUME=1).
# pydantic/fastapi/uvicorn travel as wheels in .whl/ (see benchmarks/validate_gpu.sh's header).
set -uo pipefail
OUT="${OUT:-runs/schedule_gpu}"
CONC="${CONC:-1,2,4,8,16,32,64,128}"
mkdir -p "$OUT"
# shellcheck source=benchmarks/gpu_host.sh
source "$(dirname "$0")/gpu_host.sh"
PROFILE="${PROFILE:-}"
if [ -z "$PROFILE" ]; then
    PROFILE="$OUT/vicuna7b-ngram.json"
    t0=$(date +%s)
    timeout "${SWEEP_LIMIT_S:-300}" python3 -m profiler.cli sweep --model vicuna-7b --method none,ngram \
        --k 0,1,2,3,4,5 --concurrency "$CONC" --context 256,1024 --out "$PROFILE" --no-progress --no-plots \
        > "$OUT/sweep.log" 2>&1
    rc=$?
    echo "sweep rc=$rc in $(($(date +%s) - t0)) s"
    [ $rc -eq 0 ] || { tail -20 "$OUT/sweep.log"; exit $rc; }
fi
timeout "${BENCH_LIMIT_S:-480}" python3 benchmarks/schedule_serve_bench.py --profile "$PROFILE" \
    --method ngram --itl-ms "${SLA_MS:-20}" --controlled "${CONTROLLED:-alpha=0.7,coverage=0.8}" \
    --fixed-k "${FIXED_K:-2,4}" --concurrency "$CONC" --isl "${ISL:-384}" --osl "${OSL:-64}" \
    --waves "${WAVES:-4}" --repeats "${REPEATS:-1}" \
    --out "$OUT/schedule.json" ${RESUME:+--resume} 2>&1 | tee "$OUT/schedule.txt"
exit "${PIPESTATUS[0]}"
