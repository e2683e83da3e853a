"""KV eviction, shared by H2O, StreamingLLM and SnapKV (docs/methods.md §2): the cache physically holds
at most `budget` tokens per layer and KV head (tokaccel.cache.EvictionLayer).

Every attention call of an active layer runs: append the new tokens -> attention over the stored
slots and the new tokens -> the policy updates each slot's score from what attention saw ->
the layer keeps the `budget` slots of highest priority. So the cache is compressed at the end of
the prefill (or of every chunk, if the prompt is fed in chunks) and by one token per decode step.

Attention never builds an N x N probability matrix: the prefill runs HF's own SDPA (exact: the
stored part is empty), scores come from tile-wise column sums of exp(q.k * scale - lse)
(`tokaccel.kernels.attention_column_sums`), and a decode step that needs probabilities uses
`decode_attention_probs`, which returns them beside the output.

Padding: HF's mask is right for the columns of the new tokens only (the stored slots are no longer
contiguous), so the new tokens' validity is read off its diagonal and stored per slot; stored
slots are masked with that. Padding slots are evicted first and never count as kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..cache import EvictionLayer, call_cache, install_eviction_layer
from ..validation import check_count_or_fraction
from .base import TREE_KWARG, LayerContext, Policy
from .dense import dense_attention, dense_with_stats

INF = float("inf")
PROTECTED = 2.0 ** 52  # priority of a slot that must be kept (+ its position: the newest win ties); fp64


def share(part, budget: int) -> int:
    """Tokens of `budget` given to a part set as tokens (int) or as a fraction of the budget (float)."""
    return min(budget, round(part * budget) if isinstance(part, float) else int(part))


def new_token_valid(mask: torch.Tensor | None, q: int, n: int) -> torch.Tensor | None:
    """[B, q] bool: which of the call's q new tokens are real, from HF's 4-D mask [B, 1, q, n]
    (its last q columns are the new tokens; a token sees itself unless it is padding). None: all."""
    if mask is None:
        return None
    if mask.dim() != 4:
        raise NotImplementedError(f"KV eviction expects a 4-D attention mask, got {mask.dim()}-D")
    diag = mask[:, 0, :, n - q:].diagonal(dim1=-2, dim2=-1)  # [B or 1, q]
    return diag if diag.dtype == torch.bool else diag == 0  # float masks: 0 = attend


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                      key_valid: torch.Tensor | None) -> torch.Tensor:
    """SDPA of query [B, H, q, D] over key/value [B, Hk, N, D] whose last q slots are the queries'
    own tokens (causal among them), stored slots masked per KV head by key_valid [B, Hk, N].
    GQA without repeating K/V: the G heads of a KV head become G*q query rows. -> [B, q, H, D]."""
    B, H, q, D = query.shape
    Hk, N = key.shape[1], key.shape[2]
    G = H // Hk
    mask = None
    if q > 1 or key_valid is not None:
        allowed = torch.ones(q, N, dtype=torch.bool, device=query.device).tril(N - q)  # [q, N] causal
        if key_valid is not None:
            allowed = allowed & key_valid[:, :, None, :]
            allowed[..., torch.arange(q), torch.arange(N - q, N)] = True  # a padding query sees itself (no NaN)
            mask = allowed[:, :, None].expand(B, Hk, G, q, N).reshape(B, Hk, G * q, N)
        else:
            mask = allowed.repeat(G, 1)
    out = F.scaled_dot_product_attention(query.reshape(B, Hk, G * q, D), key, value, attn_mask=mask, scale=scale)
    return out.reshape(B, H, q, D).transpose(1, 2)


@dataclass
class Eviction(Policy):
    """Base of the eviction policies. Subclasses define `observe` (update slot scores after a call)
    and `priority` (which slots to keep); they set `decode_probs` when a decode step needs the
    attention probabilities of every stored key."""

    captures_layer_inputs: ClassVar[bool] = True
    decode_probs: ClassVar[bool] = False

    budget: int | float = 2048

    def validate(self) -> None:
        """Subclasses with options of their own call this first."""
        check_count_or_fraction(self.name, "budget", self.budget, "tokens kept per layer", "a fraction of the prompt",
                                high_open=True)

    def on_patch(self, model: torch.nn.Module, contexts: list[LayerContext]) -> list:
        """A pre-hook per active layer that installs an EvictionLayer into the cache it is called with."""
        return [ctx.module.register_forward_pre_hook(self._install_hook(ctx), with_kwargs=True)
                for ctx in contexts if ctx.policy is not None]

    def _install_hook(self, ctx: LayerContext):
        layer_idx = ctx.info.layer_idx

        def hook(module, args, kwargs):
            cache = call_cache(kwargs)
            if cache is None:
                return
            if layer_idx < len(cache.layers) and getattr(cache.layers[layer_idx], "is_sliding", False):
                return  # a sliding-window layer keeps its own window
            install_eviction_layer(cache, layer_idx, self.budget)

        return hook

    # ------------------------------------------------------------------ per call
    def attend(self, ctx, module, query, key, value, attention_mask, **kwargs):
        if kwargs.pop(TREE_KWARG, None) is not None:
            raise NotImplementedError(f"{self.name}: tree verification (speculative decoding) needs every token kept")
        if kwargs.get("sliding_window") is not None:
            return dense_with_stats(ctx, module, query, key, value, attention_mask, **kwargs)
        for unsupported in ("softcap", "s_aux"):
            if kwargs.get(unsupported) is not None:
                raise NotImplementedError(f"{self.name}: attention with {unsupported} is not supported")
        cache = ctx.inputs.get("cache")
        idx = ctx.info.layer_idx
        layer = cache.layers[idx] if cache is not None and idx < len(cache.layers) else None
        if not isinstance(layer, EvictionLayer):  # no cache (use_cache=False): nothing to keep or evict
            return dense_with_stats(ctx, module, query, key, value, attention_mask, **kwargs)
        B, H, q, D = query.shape
        N = key.shape[2]
        new_valid = new_token_valid(attention_mask, q, N)
        layer.admit(new_valid)
        key_valid = layer.valid if layer.has_padding else None
        scale = kwargs.get("scaling")
        scale = float(scale if scale is not None else getattr(module, "scaling", D ** -0.5))
        ctx.stats.record_read(B, q, N, key.shape[1], D, key.element_size())
        probs = None
        if N == q:  # nothing stored yet: HF's own attention and mask, exactly dense
            out, _ = dense_attention(module, query, key, value, attention_mask, **kwargs)
        elif q == 1 and self.decode_probs:
            from ..kernels.ops import decode_attention_probs

            out, probs = decode_attention_probs(query[:, :, 0], key, value, scale, key_valid)
            out = out[:, None]
        else:
            out = grouped_attention(query, key, value, scale, key_valid)
        self.observe(layer, query, key, scale, key_valid, new_valid, probs)
        dropped = layer.evict(self.priority(layer))
        if dropped:
            ctx.stats["evicted_tokens"] += dropped
        return out, None

    def observe(self, layer: EvictionLayer, query, key, scale: float, key_valid, new_valid, probs) -> None:
        """Update `layer.score` [B, Hk, N] after attention of query [B, H, q, D] over key [B, Hk, N, D]
        (its last q slots are the new tokens); probs [B, Hk, N] when `decode_probs` and q == 1."""

    def priority(self, layer: EvictionLayer) -> torch.Tensor:
        """[B, Hk, N]: the layer keeps the `budget` slots of highest priority."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses
    @staticmethod
    def protect(score: torch.Tensor, protected: torch.Tensor, layer: EvictionLayer) -> torch.Tensor:
        """fp64 priority: `score` [B, Hk, N], but protected slots above every score, the newest
        first (so a budget smaller than the protected set keeps the newest, deterministically)."""
        return torch.where(protected, layer.pos.double() + PROTECTED, score.double())

    @staticmethod
    def recent_mask(layer: EvictionLayer, tokens: int) -> torch.Tensor:
        """[B, Hk, N] bool: slots among the last `tokens` positions seen."""
        return layer.pos >= layer.seen - tokens

    @staticmethod
    def sink_mask(layer: EvictionLayer, tokens: int) -> torch.Tensor:
        """[B, Hk, N] bool: slots among each row's first `tokens` real tokens."""
        return layer.pos < (layer.row_start + tokens)[:, None, None]
