"""patch_model / unpatch_model / patched: plug a policy into any HF model that dispatches its
attention through `AttentionInterface`.

One entry function is registered (lazily, on the first patch) under the name "tokaccel" in both
`AttentionInterface` and `AttentionMaskInterface`; the policy itself is stored on each patched
attention module, so two models in one process can carry different policies.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask, sdpa_mask

from .cache import call_cache
from .policies import LayerContext, LayerInfo, Policy
from .registry import make_policy
from .policies.dense import dense_with_stats
from .stats import Stats

logger = logging.getLogger(__name__)

ENTRY_NAME = "tokaccel"
_CTX_ATTR = "_tokaccel_ctx"
_PATCH_ATTR = "_tokaccel_patch"
_registered = False
# id(config) -> mask kind ("sdpa" | "flash") for the configs of patched models
_mask_kinds: dict[int, str] = {}


@dataclass
class PatchState:
    """Everything patch_model changed on one model, so unpatch_model can undo it exactly."""

    policy: Policy
    stats: Stats
    contexts: list[LayerContext]
    modules: list[torch.nn.Module]
    saved_impls: list[tuple[object, object]]  # (config, its previous _attn_implementation_internal)
    handles: list = field(default_factory=list)


def _attention_entry(module, query, key, value, attention_mask, **kwargs):
    ctx: LayerContext | None = module.__dict__.get(_CTX_ATTR)
    if ctx is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) uses "
            f"attn_implementation={ENTRY_NAME!r} but was not patched: use tokaccel.patch_model(model, ...)"
        )
    if ctx.policy is None:
        return dense_with_stats(ctx, module, query, key, value, attention_mask, **kwargs)
    return ctx.policy.attend(ctx, module, query, key, value, attention_mask, **kwargs)


def _mask_entry(*args, config=None, **kwargs):
    if _mask_kinds.get(id(config), "sdpa") == "flash":
        return flash_attention_mask(*args, config=config, **kwargs)
    return sdpa_mask(*args, config=config, **kwargs)


def _ensure_registered() -> None:
    global _registered
    if not _registered:
        AttentionInterface.register(ENTRY_NAME, _attention_entry)
        AttentionMaskInterface.register(ENTRY_NAME, _mask_entry)
        _registered = True


def _dispatches_through_interface(module: torch.nn.Module) -> bool:
    source_module = sys.modules.get(type(module).__module__)
    try:
        source = inspect.getsource(source_module)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def _decoder_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Causal self-attention modules of the (text) decoder: HF attention classes carrying `layer_idx`."""
    found = []
    for module in model.modules():
        if module is model or not hasattr(module, "layer_idx") or not hasattr(module, "config"):
            continue
        if "Attention" not in type(module).__name__ or not getattr(module, "is_causal", True):
            continue
        found.append(module)
    return found


def _layer_info(module: torch.nn.Module) -> LayerInfo:
    config = module.config
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(module, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // num_heads
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        layer_type = layer_types[module.layer_idx]
        sliding = getattr(module, "sliding_window", None) or getattr(config, "sliding_window", None)
        sliding = sliding if layer_type == "sliding_attention" else None
    else:  # e.g. Mistral: no layer_types, one `config.sliding_window` (None or a size) for every layer
        sliding = getattr(module, "sliding_window", None) or getattr(config, "sliding_window", None)
        layer_type = "sliding_attention" if sliding else "full_attention"
    return LayerInfo(module.layer_idx, num_heads, num_kv_heads, head_dim, sliding, layer_type)


def _capture_inputs_hook(ctx: LayerContext):
    def hook(module, args, kwargs):
        ctx.inputs["cache"] = call_cache(kwargs)
        ctx.inputs["position_embeddings"] = kwargs.get("position_embeddings")

    return hook


def patch_model(model: torch.nn.Module, policy: str | Policy = "dense", **config) -> torch.nn.Module:
    """Make `model`'s decoder attention run `policy`; returns the same model object.

    `policy` is a registered name (see `tokaccel.policies()`), a spec "name:key=value,..." or a
    Policy instance; `config` sets the policy's fields. Raises ValueError for unknown policies,
    bad values or a model patched twice, NotImplementedError for models whose attention does not
    dispatch through transformers' `AttentionInterface`.
    """
    if hasattr(model, _PATCH_ATTR):
        current = getattr(model, _PATCH_ATTR).policy
        raise ValueError(f"model is already patched with {current}; call tokaccel.unpatch_model(model) first")
    policy = make_policy(policy, **config)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch_model expects a transformers model (torch.nn.Module), got {type(model).__name__}")
    modules = _decoder_attention_modules(model)
    if not modules:
        raise NotImplementedError(
            f"{type(model).__name__}: no decoder attention modules found (HF attention classes with a "
            "`layer_idx`); tokaccel supports transformers models whose attention uses AttentionInterface"
        )
    unsupported = sorted({type(m).__name__ for m in modules if not _dispatches_through_interface(m)})
    if unsupported:
        raise NotImplementedError(
            f"{type(model).__name__}: attention class(es) {unsupported} do not dispatch through "
            "transformers' AttentionInterface (ALL_ATTENTION_FUNCTIONS), so tokaccel cannot plug into them"
        )
    _ensure_registered()

    stats = Stats()
    mask_kind = policy.mask_kind(model)
    contexts = []
    for module in modules:
        info = _layer_info(module)
        active = policy.applies_to(info)
        ctx = LayerContext(
            info=info,
            policy=policy if active else None,
            stats=stats,
            module=module,
            state=policy.new_layer_state(info) if active else None,
            mask_kind=mask_kind,
        )
        contexts.append(ctx)
    if not any(ctx.policy is not None for ctx in contexts):
        raise NotImplementedError(f"{policy.name}: no layer of {type(model).__name__} is one it applies to")

    configs = list({id(m.config): m.config for m in modules}.values())
    saved_impls = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    handles = []
    for module, ctx in zip(modules, contexts):
        module.__dict__[_CTX_ATTR] = ctx
        if ctx.policy is not None and policy.captures_layer_inputs:
            handles.append(module.register_forward_pre_hook(_capture_inputs_hook(ctx), with_kwargs=True))
    # The attribute HF's own `_attn_implementation` property reads; set directly (not through
    # `set_attn_implementation`) so only the decoder's config changes, e.g. not a VLM's vision tower.
    for cfg in configs:
        cfg._attn_implementation_internal = ENTRY_NAME
        _mask_kinds[id(cfg)] = mask_kind
    state = PatchState(policy, stats, contexts, modules, saved_impls, handles)
    setattr(model, _PATCH_ATTR, state)
    try:
        handles.extend(policy.on_patch(model, contexts))
    except Exception:
        unpatch_model(model)
        raise
    logger.info("patched %s with %s (%d/%d layers)", type(model).__name__, policy,
                sum(c.policy is not None for c in contexts), len(contexts))
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo patch_model exactly: hooks removed, attention implementation restored."""
    state = patch_state(model)
    if state is None:
        raise ValueError("model is not patched by tokaccel")
    for handle in state.handles:
        handle.remove()
    for module in state.modules:
        module.__dict__.pop(_CTX_ATTR, None)
    for cfg, impl in state.saved_impls:
        cfg._attn_implementation_internal = impl
        _mask_kinds.pop(id(cfg), None)
    delattr(model, _PATCH_ATTR)
    return model


@contextlib.contextmanager
def patched(model: torch.nn.Module, policy: str | Policy = "dense", **config):
    """`with tokaccel.patched(model, policy="...")`: patched inside the block, restored after, even on error."""
    patch_model(model, policy, **config)
    try:
        yield model
    finally:
        unpatch_model(model)


def patch_state(model: torch.nn.Module) -> PatchState | None:
    """What patch_model installed on `model` (its policy, the per-layer contexts, the counters),
    or None when the model is not patched. The one reader of the attribute patch_model sets."""
    return getattr(model, _PATCH_ATTR, None)


def get_policy(model: torch.nn.Module) -> Policy | None:
    """The policy a model is patched with, or None."""
    state = patch_state(model)
    return state.policy if state else None


def stats(model: torch.nn.Module) -> dict:
    """Counters of a patched model (see tokaccel.stats.Stats) with derived rates."""
    state = patch_state(model)
    if state is None:
        raise ValueError("model is not patched by tokaccel")
    return state.stats.summary()


def reset_stats(model: torch.nn.Module) -> None:
    state = patch_state(model)
    if state is None:
        raise ValueError("model is not patched by tokaccel")
    state.stats.clear()
