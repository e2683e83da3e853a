"""Which tokens attention reads: the selector's tensor operations and the soft-vote scorer.

A *scorer* turns queries and candidate keys into one vote per candidate token ([B, N] fp32,
-inf for non-candidates). The *selector* (run by `tokaccel.policies.engine` for every selection
policy) takes the top-k of the votes, plus the attention sinks (first `n_init` real tokens of each
row) and the local window, with a selection cache that reuses the previous index set while the
query barely moves. The result is one sorted index set per batch row, shared by all heads.

Index sets are *left-aligned*: invalid entries (padding, rows with fewer candidates than `k`)
come first and are masked, valid entries follow in increasing position order. Compact positions
are then simply `0..L-1` for every row: a row's valid tokens are contiguous and end at `L - 1`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

HEAD_MAPPINGS = ("group", "release_mod")
NEG_INF = float("-inf")


def group_queries(q: torch.Tensor, num_kv_heads: int, head_mapping: str = "group") -> torch.Tensor:
    """Order query heads [B, H, ...] so that head h reads KV head h // G (HF's `repeat_kv` order).

    "group" is already that order. "release_mod" reproduces the official TokenSelect release,
    where query head h reads KV head h mod Hk: heads are permuted so that `grouped_scores`' h // G
    lands on h mod Hk. The permutation is harmless for a vote that sums over heads.
    """
    if head_mapping == "group":
        return q
    B, H = q.shape[:2]
    G = H // num_kv_heads
    return q.reshape(B, G, num_kv_heads, *q.shape[2:]).transpose(1, 2).reshape(q.shape)


def score_rows(q: torch.Tensor, num_kv_heads: int, head_mapping: str = "group",
               query_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scoring queries q [B, H, D] or [B, H, w, D] as score rows [B, R = H*w, D] (row h*w + i reads
    KV head h // G) and their vote weights [B, R] fp32 (0 for a query that query_valid [B, w] marks
    as padding; None when every query votes)."""
    B, H = q.shape[:2]
    rows = group_queries(q, num_kv_heads, head_mapping).reshape(B, -1, q.shape[-1])
    weights = None
    if query_valid is not None:
        weights = query_valid[:, None, :].expand(B, H, -1).reshape(B, -1).float()
    return rows, weights


def soft_vote(
    q: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    valid: torch.Tensor | None = None,
    head_mapping: str = "group",
    query_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """TokenSelect's per-head soft vote: v[b, t] = sum_{h, i} softmax_t(scale * q[b, h, i] . K[b, kv(h), t]).

    q [B, H, D] (one query per head) or [B, H, w, D] (w queries per head, each votes separately);
    keys [B, Hk, N, D]; valid [B, N] bool (False: not a candidate); query_valid [B, w] bool
    (False: that query does not vote). Returns [B, N] fp32, -inf where not valid.
    Two passes over the logits: max and exp-sum per (head, query), then one normalised head sum.
    """
    from .kernels.ops import grouped_scores  # lazy: keeps `import tokaccel` free of triton
    from .kernels.soft_vote import softmax_head_sum

    qf, weights = score_rows(q, keys.shape[1], head_mapping, query_valid)
    s = grouped_scores(qf.to(keys.dtype), keys, scale)  # [B, H*w, N] fp32
    if valid is not None:
        s.masked_fill_(~valid[:, None], NEG_INF)
    vote = softmax_head_sum(s, weights, overwrite=True)  # [B, N]
    if valid is not None:
        vote.masked_fill_(~valid, NEG_INF)
    return vote


def top_k(vote: torch.Tensor, k: int, pool: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` best candidates per row: (idx [B, k'] sorted ascending, valid [B, k']), k' = min(k, N).

    vote [B, N] (-inf: not a candidate, never selected). `pool`: max-pool the votes (odd kernel,
    stride 1, same length) so that neighbours of a strong token are kept too.
    """
    if pool is not None and pool > 1:
        pooled = F.max_pool1d(vote[:, None], pool, stride=1, padding=pool // 2)[:, 0]
        vote = pooled.masked_fill(torch.isneginf(vote), NEG_INF)
    values, idx = vote.topk(min(k, vote.shape[1]), dim=1, sorted=False)
    idx, order = idx.sort(dim=1)
    return idx, values.gather(1, order) > NEG_INF


@dataclass
class DecodeRows:
    """The K/V rows a layer's last decode step gathered (`TokenSelect.reuse_rows`, CPU): column j
    holds row idx[:, j], its key rotated to compact position j in compact mode."""

    idx: torch.Tensor  # [B, L] long: the index set of that step
    valid: torch.Tensor  # [B, L] bool
    keys: torch.Tensor  # [B, Hk, capacity >= L, D] natural head-dim layout
    values: torch.Tensor  # [B, Hk, capacity, D]


@dataclass
class SelectionState:
    """The selection cache of one layer and sequence (paper Alg. 1), one entry per batch row."""

    query: torch.Tensor  # [B, F] fp32: the scoring query that made each row's selection
    mid: torch.Tensor  # [B, M] long: the selected candidates, sorted
    mid_valid: torch.Tensor  # [B, M] bool
    local_start: torch.Tensor  # [B] long: start of the local window when the selection was made
    rows: DecodeRows | None = None  # the rows gathered for this selection, reused while it hits


def cache_hits(state: SelectionState | None, query: torch.Tensor, theta: float) -> torch.Tensor:
    """Rows whose query [B, F] may reuse the cached selection: cos(query, cached) >= theta.

    theta = 0 always reuses (after a first selection), theta = 1 only for an identical query.
    """
    B = query.shape[0]
    if state is None or state.query.shape != query.shape:
        return torch.zeros(B, dtype=torch.bool, device=query.device)
    if theta <= 0:
        return torch.ones(B, dtype=torch.bool, device=query.device)
    same = (query == state.query).all(dim=1)
    return same | (F.cosine_similarity(query, state.query, dim=1) >= theta)


def merge_rows(keep: torch.Tensor, old: SelectionState, new: SelectionState) -> SelectionState:
    """Per row: `old` where keep [B] is True, else `new` (index sets padded to one width)."""
    width = max(old.mid.shape[1], new.mid.shape[1])

    def pad(t, value):
        return F.pad(t, (0, width - t.shape[1]), value=value)

    rows = keep[:, None]
    return SelectionState(
        torch.where(rows, old.query, new.query),
        torch.where(rows, pad(old.mid, 0), pad(new.mid, 0)),
        torch.where(rows, pad(old.mid_valid, False), pad(new.mid_valid, False)),
        torch.where(keep, old.local_start, new.local_start),
    )


def assemble(
    first: torch.Tensor,
    n_init: int,
    mid: torch.Tensor,
    mid_valid: torch.Tensor,
    local_start: torch.Tensor,
    end: int,
    key_valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The index set sinks ∪ mid ∪ [local_start, end), left-aligned: (idx [B, L], valid [B, L]).

    first [B]: each row's first real token (sinks are [first, first + n_init)); mid [B, M] sorted
    selections between the sinks and the local window; local_start [B]; key_valid [B, >= end] or None.
    """
    B, device = mid.shape[0], mid.device
    sinks = first[:, None] + torch.arange(n_init, device=device)
    width = end - int(local_start.min())
    local = torch.arange(end - width, end, device=device).expand(B, width)
    idx = torch.cat((sinks, mid, local), dim=1)
    valid = torch.cat((sinks < local_start[:, None], mid_valid, local >= local_start[:, None]), dim=1)
    idx = idx.clamp_(0, max(end - 1, 0))
    if key_valid is not None:
        valid &= key_valid.gather(1, idx)
    if not bool(valid.all()):
        order_key, order = torch.where(valid, idx, -1).sort(dim=1)
        idx, valid = idx.gather(1, order), order_key >= 0
        drop = int((~valid).sum(1).min())
        idx, valid = idx[:, drop:], valid[:, drop:]
    return idx, valid


def attend_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool = False
) -> torch.Tensor:
    """Attention of q [B, H, S, D] over gathered k/v [B, Hk, L, D] (GQA, no repeat) with a bool
    mask [B, 1, S, L] (True = read), or causal (S = L, no mask), or neither -> [B, S, H, D]. A fully
    masked row gives 0, as in SDPA. (Decode, S = 1, uses `tokaccel.kernels.indexed_decode_attention`.)"""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)
