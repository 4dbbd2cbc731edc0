# Sourced by the GPU benchmark scripts (validate_gpu.sh, schedule_gpu.sh): the environment every run
# there uses, the serving packages the GPU host lacks (installed from wheels in .whl/, see
# validate_gpu.sh's header), and the GPU, versions and commit printed at the top of the output.
# Exits 3 when the wheels are missing.
export PYTHONPATH=. NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if ! python3 -c "import pydantic, fastapi, uvicorn, prometheus_client, yaml, tqdm" 2>/dev/null; then
    python3 -m pip install -q --no-index --find-links .whl --find-links build/gpuwheels \
        pydantic fastapi uvicorn prometheus_client pyyaml tqdm ||
        { echo "$(basename "$0"): missing wheels for pydantic/fastapi/uvicorn in .whl/ (see validate_gpu.sh)"; exit 3; }
fi
# openai is for the serve tests only (tests/engine/serve): installed when its wheel travelled
python3 -c "import openai" 2>/dev/null ||
    python3 -m pip install -q --no-index --find-links .whl openai 2>/dev/null ||
    echo "note: no openai wheel in .whl/: tests/engine/serve cannot run here"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
