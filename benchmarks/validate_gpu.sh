#!/usr/bin/env bash
# H200 prediction table (issue 13): vicuna-7b fp16 with random weights, the default GPU grid sweep
# (configs/sweeps/default.yaml, section gpu: none/ngram/draft with llama-68m, k 0..5, c 1..128,
# context 512 and 2048), then `profiler validate`: off-grid points of none, ngram and draft run end
# to end through `engine serve` over HTTP with the profiler's load generator, the speculative configs at
# a controlled acceptance (random weights accept nothing; engine/spec/controlled.py), predicted by the
# planner at the acceptance the server's counters measured. Prints predicted vs measured mean ITL, p90
# ITL and throughput per GPU per point and the error summary per method.
#
# From the repo root on the GPU host:   OUT=runs/validate_gpu bash benchmarks/validate_gpu.sh
# Knobs: K (the k validated for ngram and draft, default 4), POINTS (per config, default 3), OSL
# (output tokens per request, default 128), WAVES (closed-loop rounds per point, default 3), MIN_REQUESTS
# (requests per point at least, default 24),
# CONTROLLED (default alpha=0.7,coverage=0.8), SWEEP_LIMIT_S, VALIDATE_LIMIT_S, PROFILE (skip the
# sweep and validate this profile), SWEEP_ARGS (sweep flags instead of the default GPU grid, e.g. a
# smaller grid), DRAFT (draft model, default llama-68m), DATASET (prompts JSONL; default: the packaged
# Spec-Bench set), METHODS (validated methods, default none,ngram,draft).
# The GPU host has torch, triton, httpx, scipy but not pydantic/fastapi/uvicorn: they travel as wheels
# in .whl/ (ignored by git; carry it). Fill it on a machine with network access for the host's Python:
#   pip download -d .whl --only-binary=:all: --python-version 3.12 pydantic fastapi uvicorn \
#       prometheus_client pyyaml tqdm openai   (openai: only for running tests/engine/serve there)
set -uo pipefail
OUT="${OUT:-runs/validate_gpu}"
K="${K:-4}"
mkdir -p "$OUT"
# shellcheck source=benchmarks/gpu_host.sh
source "$(dirname "$0")/gpu_host.sh"
PROFILE="${PROFILE:-}"
if [ -z "$PROFILE" ]; then
    PROFILE="$OUT/vicuna7b.json"
    t0=$(date +%s)
    # shellcheck disable=SC2086  # SWEEP_ARGS is a list of flags
    timeout "${SWEEP_LIMIT_S:-300}" python3 -m profiler.cli sweep ${SWEEP_ARGS:-} --out "$PROFILE" \
        --no-progress --no-plots > "$OUT/sweep.log" 2>&1
    rc=$?
    echo "sweep rc=$rc in $(($(date +%s) - t0)) s"
    tail -25 "$OUT/sweep.log"
    [ $rc -eq 0 ] || exit $rc
fi
data=()
[ -n "${DATASET:-}" ] && data=(--dataset "$DATASET")
t0=$(date +%s)
timeout "${VALIDATE_LIMIT_S:-500}" python3 -m profiler.cli validate "$PROFILE" \
    --method "${METHODS:-none,ngram,draft}" --k "0,$K" --points "${POINTS:-3}" --max-tokens "${OSL:-128}" \
    --requests-per-seq "${WAVES:-3}" --min-requests "${MIN_REQUESTS:-24}" --controlled "${CONTROLLED:-alpha=0.7,coverage=0.8}" \
    --draft-model "${DRAFT:-llama-68m}" ${data[@]+"${data[@]}"} 2>&1 | tee "$OUT/validate.txt"
rc=${PIPESTATUS[0]}
echo "validate rc=$rc in $(($(date +%s) - t0)) s"
exit $rc
