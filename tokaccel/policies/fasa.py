"""FASA (arXiv 2602.03152): frequency-aware sparse attention (docs/methods.md §1.3).

RoPE splits q.k into D/2 independent 2-D frequency chunks (FCs). An offline calibration
(`tokaccel calibrate --model NAME --policy fasa`, `tokaccel.calibrate`) finds, per layer and
KV head, the few FCs whose partial score best agrees with the full score on which tokens are
top-K. FASA scores candidates with those dims only, q[dims] . K[dims], soft-votes over heads and
takes the top k; everything else is the selection engine's (`tokaccel.policies.engine`: sinks,
local window, selection cache, chunked prefill, sparse full-dim attention, position modes): this
class is the scorer (`choose`), the key layout it wants (`key_layout`) and the calibration it
loads. Layer 0 stays dense (`dense_layers`), as in the paper.

Store/read: the cache stores each KV head's key dims permuted, its d = 2 * n_fc dominant dims
first (`key_layout` -> `SelectionLayer.key_order`, set before the first token), so the scorer reads d / D of the
key bytes (25% at the default n_fc = D/8), with no second copy of any key. On a GPU the keys stay
rows and the scorer reads the slice K[..., :d] (whole 32-byte sectors). On CPU, when d divides D,
they are stored as D/d column tiles (`SelectionLayer.key_tile`): the dominant dims of all tokens
are one contiguous [N, d] block per head: a CPU scores a strided slice of the rows 1.4-2.2x slower
(`benchmarks/score_tiles.py`). Attention un-permutes (and untiles) the rows it reads (the indexed
attention kernels take the inverse, `key_columns`; dense fallbacks copy the context back to the
natural layout, only while it fits the budget).

Differences from the paper, and why: the selector is TokenSelect's soft vote with one index set
per layer (the paper ranks by the raw partial score per head); the FC pairing is HF's
(i, i + D/2) by default, the release's (2i, 2i+1) with pairing="interleaved" (docs/methods.md §1.3).
In compact mode keys are pre-RoPE and the query is rotated at distance n_local; each FC's
partial score stays that FC's term of q.k because a rotation only mixes the two dims of a chunk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..rope import RopeTable
from ..selection import NEG_INF, score_rows, top_k
from ..validation import check_choice, check_int, check_optional_int
from .base import LayerInfo
from .engine import KeyLayout, LayerRuntime, SelectionPolicy
from .fasa_calibration import PAIRINGS, calibrate_command, calibration_path, fc_dims, load_calibration, model_key_of


@dataclass
class FasaRuntime(LayerRuntime):
    """A FASA layer's state: its dominant dims and the key order they give the cache."""

    dims: torch.Tensor | None = None  # [Hk, d] long: each KV head's dominant dims
    order: torch.Tensor | None = None  # [Hk, D] long: the cache's dim order, dims first then the rest

    def set_dims(self, dims: torch.Tensor, head_dim: int) -> None:
        self.dims, self.order = dims, dominant_first(dims.cpu(), head_dim).to(dims.device)


def calibration_identity(cal: dict, source: str) -> dict:
    """Where a calibration came from, its settings and a digest of its content (for results)."""
    settings = ("model", "pairing", "selection", "n_fc", "top_k", "samples", "length", "queries_per_sample",
                "chosen_overlap_mean", "combined_overlap_mean")
    return {"source": source, "sha256": content_digest(cal), **{k: cal.get(k) for k in settings}}


def content_digest(cal: dict) -> str:
    """16 hex digits of sha256 over the calibration's JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(cal, sort_keys=True).encode()).hexdigest()[:16]


def resized(chosen: list[int], overlap: list[float], n_fc: int, selection: str) -> list[int]:
    """n_fc FCs of one head from a calibration that chose `chosen`: by single-FC overlap for a
    "single" calibration; for a "combined" one the first n_fc of its greedy order, topped up by
    single-FC overlap when n_fc is larger."""
    if selection != "combined":
        return torch.tensor(overlap).topk(n_fc).indices.tolist()
    ranking = torch.tensor(overlap).topk(len(overlap)).indices.tolist()
    return (list(chosen) + [f for f in ranking if f not in chosen])[:n_fc]


def dominant_first(dims: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[Hk, D] long: per KV head, its dominant dims ([Hk, d]) then the other dims ascending."""
    rest = torch.ones(dims.shape[0], head_dim, dtype=torch.bool).scatter_(1, dims, False)
    others = torch.arange(head_dim).expand(dims.shape[0], -1)[rest].view(dims.shape[0], -1)
    return torch.cat((dims, others), dim=1)


@dataclass
class FASA(SelectionPolicy):
    """A soft-vote scorer that reads only each head's dominant frequency chunks.
    Defaults: the paper's for the chunks and layers; the engine's (TokenSelect's) for everything else.

    calibration: a calibration dict (`tokaccel.calibrate.calibrate_fasa`), a JSON path, or None
        for the model's default file ($TOKACCEL_CACHE/fasa/<model>.<pairing>.json).
    n_fc: FCs per KV head used to score; None = the calibration's (25% of D/2). At most D/2;
        a smaller n_fc keeps the best n_fc of the calibrated ranking.
    pairing: "hf" (FC i = dims (i, i + D/2), HF's rotate_half) or "interleaved" ((2i, 2i+1),
        the release's); must match the calibration's.
    dense_layers: the first layers, which stay dense (1: layer 0, as in the paper).
    Other options: see SelectionPolicy.
    """

    name: ClassVar[str] = "fasa"
    description: ClassVar[str] = "FASA: TokenSelect scored with each head's dominant RoPE frequency chunks (calibrated)"

    calibration: Any = field(default=None, repr=False)
    n_fc: int | None = None
    pairing: str = "hf"
    dense_layers: int = 1

    def validate(self) -> None:
        super().validate()
        check_choice(self.name, "pairing", self.pairing, PAIRINGS)
        check_optional_int(self.name, "n_fc", self.n_fc, 1)
        check_int(self.name, "dense_layers", self.dense_layers, 0)
        if self.calibration is not None and not isinstance(self.calibration, (dict, str)) \
                and not hasattr(self.calibration, "__fspath__"):
            raise ValueError(f"fasa: calibration={type(self.calibration).__name__} is not valid; expected None, "
                             "a calibration dict or a path to a calibration JSON")

    def config(self) -> dict:
        config = super().config()
        if isinstance(self.calibration, dict):
            config["calibration"] = f"<dict for {self.calibration.get('model', '?')}>"
        elif self.calibration is not None:
            config["calibration"] = str(self.calibration)
        return config

    def applies_to(self, layer: LayerInfo) -> bool:
        return layer.layer_idx >= self.dense_layers and super().applies_to(layer)

    def new_layer_state(self, layer: LayerInfo) -> FasaRuntime:
        return FasaRuntime()

    def standalone_state(self, layer: LayerInfo, rope: RopeTable | None) -> FasaRuntime:
        """n_fc (default D/8) random frequency chunks per KV head, a different set per head (seed 0),
        in place of a calibration: which chunks does not change the cost."""
        D, Hk = layer.head_dim, layer.num_kv_heads
        n_fc = self.n_fc or max(1, round(0.25 * D / 2))
        g = torch.Generator().manual_seed(0)
        fcs = [sorted(torch.randperm(D // 2, generator=g)[:n_fc].tolist()) for _ in range(Hk)]
        state = FasaRuntime(rope=rope)
        state.set_dims(torch.tensor([fc_dims(f, D, self.pairing) for f in fcs], dtype=torch.long), D)
        return state

    def on_patch(self, model: torch.nn.Module, contexts) -> list:
        """Load the calibration, check it fits the model, give each active layer its dims."""
        key = model_key_of(model)
        cal = load_calibration(self.calibration, key, self.pairing)
        source = "dict" if isinstance(self.calibration, dict) else \
            str(self.calibration or calibration_path(key, self.pairing))
        self._provenance = {"calibration": calibration_identity(cal, source)}
        active = [ctx for ctx in contexts if ctx.policy is not None]
        fix = f"; recalibrate with: {calibrate_command(key, self.pairing)}"
        if cal.get("pairing") != self.pairing:
            raise ValueError(f"fasa: the calibration pairs dims {cal.get('pairing')!r}, the policy {self.pairing!r}{fix}")
        for what, want in (("num_layers", len(contexts)),
                           ("num_kv_heads", active[0].info.num_kv_heads if active else None),
                           ("head_dim", active[0].info.head_dim if active else None)):
            if want is not None and cal.get(what) != want:
                raise ValueError(f"fasa: the calibration of {cal.get('model')!r} has {what}={cal.get(what)}, "
                                 f"this model {want}{fix}")
        for ctx in active:
            info = ctx.info
            ranked = cal["dominant_fcs"][info.layer_idx]  # per KV head
            overlap = cal.get("overlap")
            n_fc = self.n_fc if self.n_fc is not None else cal["n_fc"]
            if n_fc > info.head_dim // 2:
                raise ValueError(f"fasa: n_fc={n_fc} exceeds the D/2 = {info.head_dim // 2} FCs of layer {info.layer_idx}")
            if n_fc != len(ranked[0]):
                if overlap is None:
                    raise ValueError(f"fasa: n_fc={n_fc} differs from the calibration's {len(ranked[0])} and the "
                                     f"file has no per-FC overlaps to re-rank{fix}")
                ranked = [resized(fcs, row, n_fc, cal.get("selection", "single"))
                          for fcs, row in zip(ranked, overlap[info.layer_idx])]
            dims = torch.tensor([fc_dims(fcs, info.head_dim, self.pairing) for fcs in ranked], dtype=torch.long)
            ctx.state.set_dims(dims, info.head_dim)
        return super().on_patch(model, contexts)

    def provenance(self) -> dict:
        return getattr(self, "_provenance", {})

    def key_layout(self, state: FasaRuntime, device: torch.device | None) -> KeyLayout:
        """Each head's dominant dims first; on CPU, when d divides D, in column tiles of d (the
        dominant dims of all tokens one contiguous block), else rows."""
        d, D = state.dims.shape[1], state.order.shape[1]
        cpu_tiles = device is not None and device.type == "cpu" and d < D and D % d == 0
        return KeyLayout(state.order, d if cpu_tiles else None)

    def choose(self, call, q, start, end, valid, query_valid=None):
        """Soft vote of the partial scores q[dims] . K[dims] of candidates [start, end); see
        SelectionPolicy.choose."""
        from ..kernels.ops import fc_scores
        from ..kernels.soft_vote import softmax_head_sum

        dims = call.ctx.state.dims
        if dims.device != q.device:
            dims = call.ctx.state.dims = dims.to(q.device)
        d = dims.shape[1]
        if call.key.dim() == 5:  # column tiles: the first holds the dominant dims of every token
            keys_dom = call.key[:, :, 0, start:end]  # [B, Hk, n, d], contiguous rows
        elif call.key_columns is not None:  # rows with the dominant dims first
            keys_dom = call.key[:, :, start:end, :d]  # [B, Hk, n, d], rows strided by D
        else:  # no cache (use_cache=False): this call's keys in the natural layout
            keys = call.key[:, :, start:end]
            keys_dom = keys.gather(3, dims[None, :, None, :].expand(*keys.shape[:3], d))
        B, Hk, n, d = keys_dom.shape
        rows, weights = score_rows(q, Hk, self.head_mapping, query_valid)
        s = fc_scores(rows.to(keys_dom.dtype), keys_dom, dims, call.scale)  # [B, R, n]
        call.ctx.stats["scored_keys"] += B * n
        call.ctx.stats["kv_bytes_read"] += B * n * Hk * d * keys_dom.element_size()
        if valid is not None:
            s.masked_fill_(~valid[:, None], NEG_INF)
        vote = softmax_head_sum(s, weights, overwrite=True)
        if valid is not None:
            vote.masked_fill_(~valid, NEG_INF)
        mid, mid_valid = top_k(vote, self.k, self.pool)
        return mid + start, mid_valid
