"""tokaccel's selection policies inside vLLM (CPU backend; a CUDA one not yet run on a GPU; docs/vllm.md).

Installed beside vLLM (`pip install tokaccel[vllm]`, or scripts/setup_vllm.sh), tokaccel's
`vllm.general_plugins` entry point (`register`) replaces vLLM's CPU attention backend (`CPU_ATTN`,
the only one vLLM's CPU platform picks) with `tokaccel.vllm.backend.TokaccelCPUBackend`, a
subclass. Without a policy that backend is vLLM's own; with one, decode steps of sequences longer
than the policy's budget read `sinks ∪ selected ∪ local window` from the paged cache
(`tokaccel.vllm.paged`), everything else (prefill, short sequences, the mixed part of a batch)
goes to vLLM's kernel. The policy is a tokaccel spec, given as

* the environment variable TOKACCEL_VLLM_POLICY="tokenselect:k=1024,n_init=64,n_local=256", or
* vLLM's own config: `additional_config={"tokaccel_policy": "quest:k=1024"}` (`LLM(...)`) /
  `--additional-config '{"tokaccel_policy": "quest:k=1024"}'` (the OpenAI server: `./run.sh vllm-serve`).

Policies: tokenselect (soft vote, selection cache) and quest (page bounds kept beside the paged
cache), always with position_mode="original" (vLLM caches rotated keys).

Importing this package (or tokaccel) never imports vLLM.
"""

from __future__ import annotations

import os

ENV_POLICY = "TOKACCEL_VLLM_POLICY"
CONFIG_KEY = "tokaccel_policy"


def register() -> None:
    """The `vllm.general_plugins` entry point: on CPU, make CPU_ATTN (the only backend vLLM's CPU
    platform picks) resolve to tokaccel's subclass; on CUDA, register tokaccel's Triton subclass as
    CUSTOM (`--attention-backend CUSTOM`). vLLM calls it in every process; registering twice sets
    the same override again."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, "tokaccel.vllm.backend.TokaccelCPUBackend")
    elif current_platform.is_cuda():
        register_backend(AttentionBackendEnum.CUSTOM, "tokaccel.vllm.backend.TokaccelCUDABackend")


def policy_spec(additional_config: dict | None) -> str | None:
    """The configured policy spec: vLLM's additional_config["tokaccel_policy"], else
    $TOKACCEL_VLLM_POLICY, else None (vLLM's own attention)."""
    spec = (additional_config or {}).get(CONFIG_KEY) or os.environ.get(ENV_POLICY)
    return spec.strip() if spec and spec.strip() and spec.strip().lower() != "dense" else None


def make_vllm_policy(spec: str):
    """A SelectionPolicy from a spec, in original positions (the only ones vLLM's cache holds)."""
    from ..policies.engine import SelectionPolicy
    from ..registry import make_policy, parse_spec
    from .paged import SUPPORTED_POLICIES

    name, options = parse_spec(spec)
    if name not in SUPPORTED_POLICIES:
        raise ValueError(f"{ENV_POLICY} / {CONFIG_KEY}: supported policies are {SUPPORTED_POLICIES}, got {name!r}")
    mode = options.setdefault("position_mode", "original")
    if mode != "original":
        raise ValueError(f"{spec!r}: vLLM caches rotated keys, only position_mode=original is possible")
    policy = make_policy(name, **options)
    assert isinstance(policy, SelectionPolicy)
    return policy
