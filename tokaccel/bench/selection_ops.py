"""Op-level steps of the selection policies (tokaccel.policies.engine) for `bench ops`.

"total" is the policy's own `attend()` on one layer, as a patched model calls it (query
un-rotation in compact mode, selection-cache check, scoring, top-k, index assembly, attention);
the other parts time its pieces on the same inputs:

- decode_miss: "score" (the policy's vote over the N - n_init - n_local candidates), "topk",
  "attention" (the indexed decode kernel: gathers, re-rotates and attends over the L read rows);
- decode_hit: the selection cache holds this query's selection, so no scoring: "attention" (the
  indexed decode kernel gathering every row), "total" (with `reuse_rows`, the default, the rows
  kept from the first call: a hit on an unchanged cache gathers none);
- prefill_chunk: the last c queries of an N-token prompt; the chunk is the last of its forward,
  so it votes with its last `tail` queries ("tokenselect:tail=0" times a mean-query chunk).
  "score", "topk", "attention" (the indexed prefill kernel: gathers the selected rows + the chunk,
  re-rotates in compact mode and attends causally).

A policy whose scorer is a vote over every candidate key (TokenSelect: `vote` returns votes) is
timed as "score" (the vote) and "topk"; the others (HISA, Quest, FASA: `--impls hisa,quest,fasa`)
as "score" = the policy's whole candidate choice (`choose`: block / page scoring from the block
index, HISA's token soft vote inside the kept blocks, FASA's partial-dim vote, and their top-k),
and report no separate "topk" and no prefill chunk. The
block index is built once before timing, as a cache that has seen every token holds it (its
per-step update, at most one block re-summarised, is not timed). The layer state is the policy's
`standalone_state` (FASA: n_fc random frequency chunks per KV head stand in for a calibration) and
the cache stores keys in the policy's `key_layout` (FASA: each head's dominant dims first, in
column tiles on CPU): the random K is taken as stored in that layout.

K/V are the bench's random tensors, taken as the cache a policy stores (pre-RoPE in compact
mode). The rotary table is the standard RoPE (base 10000) of the shape's head dim.
"""

from __future__ import annotations

import torch

from ..cache import SelectionLayer
from ..registry import make_policy
from ..policies.base import LayerContext, LayerInfo
from ..policies.engine import SelectionCall, SelectionPolicy
from ..rope import RopeTable
from ..selection import assemble, top_k
from ..stats import Stats
from .ops import OpBench, OpCase, kv_bytes, register_op_bench


class StandardRotary(torch.nn.Module):
    """RoPE with base 10000 over the whole head dim, called like HF's rotary modules:
    (x, position_ids [1, n]) -> (cos, sin) [1, n, D]."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        angles = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos(), emb.sin()


class _Module:
    """What `attend` reads from an attention module."""

    def __init__(self, case: OpCase):
        self.num_key_value_groups = case.shape.groups
        self.scaling = case.shape.head_dim ** -0.5
        self.is_causal = True
        self.training = False


def _compact(policy: SelectionPolicy) -> bool:
    """Compact positions in the op bench, which has no trained length: "auto" is timed as compact."""
    return policy.position_mode != "original"


def _context(policy: SelectionPolicy, case: OpCase, queries: int, layer: SelectionLayer) -> LayerContext:
    shape = case.shape
    info = LayerInfo(0, shape.num_heads, shape.num_kv_heads, shape.head_dim, None, "full_attention")
    table = RopeTable(StandardRotary(shape.head_dim)) if _compact(policy) else None
    state = policy.standalone_state(info, table)
    for name, value in vars(state).items():  # tensors the policy keeps per layer, on the bench's device
        if isinstance(value, torch.Tensor):
            setattr(state, name, value.to(case.device))
    ctx = LayerContext(info, policy, Stats(), module=_Module(case), state=state)
    inputs = {"cache": type("Cache", (), {"layers": [layer]})()}
    if _compact(policy):  # the (cos, sin) HF passes for the queries' own positions N - queries .. N - 1
        cos, sin = table(case.n, case.device, case.dtype)
        inputs["position_embeddings"] = (cos[None, case.n - queries:], sin[None, case.n - queries:])
    ctx.inputs = inputs
    return ctx


def selection_setup(case: OpCase) -> OpBench | None:
    """decode_hit / decode_miss / prefill_chunk of a selection policy (`case.impl` spec)."""
    if case.phase not in ("decode_hit", "decode_miss", "prefill_chunk"):
        return None
    policy = make_policy(case.impl)
    if not isinstance(policy, SelectionPolicy):
        raise ValueError(f"{case.impl!r} is not a selection policy")
    if case.n <= policy.budget:
        raise ValueError(f"N={case.n} fits the budget n_init + k + n_local = {policy.budget}: the step is dense")
    x = case.inputs
    q = x.q if case.phase != "prefill_chunk" else x.q_chunk
    layer = SelectionLayer(pre_rope=_compact(policy))
    ctx = _context(policy, case, q.shape[2], layer)
    keys = x.k
    layout = policy.key_layout(ctx.state, case.device)
    if layout is not None:
        layer.use_key_order(layout.order, layout.tile)
        if layout.tile is not None:  # the cache's column tiles (random keys: their dim order is immaterial)
            from ..kernels.indexed_attention import tile_keys

            keys = tile_keys(x.k, layout.tile).contiguous()
    module, scale = ctx.module, ctx.module.scaling

    def total():
        return policy.attend(ctx, module, q, keys, x.v, None, scaling=scale)

    # the un-rotated query the pieces start from, as attend computes it
    q_in = q
    if _compact(policy):
        from ..rope import unrotate

        q_in = unrotate(q, *ctx.inputs["position_embeddings"], ctx.state.rope.scaling)
    call = SelectionCall(policy, ctx, q_in, keys, x.v, None, scale, layer, _compact(policy))
    if case.phase == "prefill_chunk":
        if not _votes_every_candidate(policy, call):
            return None  # not implemented for a scorer of its own (HISA / Quest / FASA): its miss step is timed
        return _prefill_bench(case, policy, call, total)
    return _decode_bench(case, policy, call, layer, total)


def _votes_every_candidate(policy: SelectionPolicy, call: SelectionCall) -> bool:
    """Whether the policy's scorer is `vote` over every candidate key then top-k (its `vote` returns
    votes), so the bench can time the two apart."""
    return policy.vote(call.query[:, :, 0], call.key[:, :, :1], call.scale, None) is not None


def _decode_bench(case, policy, call, layer, total) -> OpBench:
    from ..kernels.indexed_attention import indexed_decode_attention

    x, n = case.inputs, case.n
    end = n - policy.n_local
    f = call.scoring_query(call.query[:, :, 0])
    score, mid, mid_valid, score_info = _scoring(case, policy, call, f, end)
    vote_bytes = score_info.pop("vote_bytes", None)
    own_score_bytes, own_score_flops = score_info.pop("score_bytes", None), score_info.pop("score_flops", None)
    idx, valid = assemble(call.first, policy.n_init, mid, mid_valid, torch.full_like(call.first, end), n, None)
    L = idx.shape[1]
    cos, sin = call.ctx.state.rope(L, idx.device, torch.float32) if call.compact else (None, None)
    start = L - valid.sum(1)
    q_bytes = case.batch * case.shape.num_heads * case.shape.head_dim * case.itemsize
    read_bytes = kv_bytes(case, L) + q_bytes
    score_bytes = kv_bytes(case, end - policy.n_init, values=False) + q_bytes
    parts = {"attention": lambda: indexed_decode_attention(call.query[:, :, 0], call.key, x.v, idx, start, call.scale,
                                                           cos, sin, call.key_columns)}
    bytes_read = {"attention": read_bytes}
    B, H, D = case.batch, case.shape.num_heads, case.shape.head_dim
    flops = {"attention": 4 * B * H * L * D}
    if case.phase == "decode_hit":
        total()  # a first call fills the selection cache; every later call with this query hits
        if layer.selection is None:
            raise RuntimeError("the selection cache was not filled")
        parts["total"] = total
        bytes_read["total"] = read_bytes
        flops["total"] = flops["attention"]
    else:
        def miss():
            layer.selection = None
            return total()

        parts.update(score, total=miss)
        if own_score_bytes is not None:
            score_bytes = own_score_bytes + q_bytes
        bytes_read.update(score=score_bytes, total=score_bytes + read_bytes)
        if "topk" in parts:
            bytes_read["topk"] = vote_bytes
        flops.update(score=own_score_flops or 2 * B * H * (end - policy.n_init) * D)
        flops["total"] = flops["score"] + flops["attention"]
    return OpBench(parts=parts, bytes_read=bytes_read, flops=flops,
                   info={"k": policy.k, "keys_read": L, "candidates": end - policy.n_init, **score_info}, state=layer)


def _scoring(case, policy, call, f, end):
    """The timed scoring parts of a miss for scoring queries f, and its result:
    (parts, mid [B, k'] absolute rows, mid_valid, info). A vote over every candidate (TokenSelect):
    "score" (the vote) and "topk"; a scorer of its own (HISA, Quest, FASA): "score" = its `choose`,
    with the bytes and flops its stats counters record (block summaries + keys scored)."""
    start = policy.n_init
    if _votes_every_candidate(policy, call):
        candidates = case.inputs.k[:, :, start:end]
        vote = policy.vote(f, candidates, call.scale, None)
        mid, mid_valid = top_k(vote, policy.k, policy.pool)
        parts = {"score": lambda: policy.vote(f, candidates, call.scale, None),
                 "topk": lambda: top_k(vote, policy.k, policy.pool)}
        return parts, mid + start, mid_valid, {"vote_bytes": vote.numel() * 4}
    policy.choose(call, f, start, end, None)  # builds the block index on the layer
    before = Stats(call.ctx.stats)
    mid, mid_valid = policy.choose(call, f, start, end, None)
    used = Stats(call.ctx.stats)
    used.subtract(before)
    B, H, D = case.batch, case.shape.num_heads, case.shape.head_dim
    rows_per_block = 2 if getattr(policy, "block_score", "bound") == "bound" else 1  # max and min vs mean
    flops = 2 * H * D * (used["scored_keys"] + rows_per_block * used["scored_blocks"])
    info = {"score_bytes": used["kv_bytes_read"], "score_flops": flops,
            "scored_keys": used["scored_keys"] // B, "scored_blocks": used["scored_blocks"] // B}
    return {"score": lambda: policy.choose(call, f, start, end, None)}, mid, mid_valid, info


def _prefill_bench(case, policy, call, total) -> OpBench:
    from ..kernels.indexed_attention import indexed_prefill_attention

    x, n, c = case.inputs, case.n, case.inputs.chunk
    a = n - c
    end = max(a - policy.n_local, 0)
    w = min(policy.tail, c) if policy.tail else 0
    q = call.query
    f = call.scoring_query(q[:, :, -w:]) if w else call.scoring_query(q.float().mean(dim=2).to(q.dtype))
    candidates = x.k[:, :, policy.n_init:end]
    vote = policy.vote(f, candidates, call.scale, None)
    mid, mid_valid = top_k(vote, policy.k, policy.pool)
    idx, valid = assemble(call.first, policy.n_init, mid + policy.n_init, mid_valid,
                          torch.full_like(call.first, end), a, None)
    rows = torch.cat((idx, torch.arange(a, n, device=idx.device).expand(idx.shape[0], -1)), dim=1)
    col_valid = torch.cat((valid, torch.ones_like(rows[:, idx.shape[1]:]).bool()), dim=1)
    L = rows.shape[1]
    cos, sin = call.ctx.state.rope(L, q.device, torch.float32) if call.compact else (None, None)
    B, H, D = case.batch, case.shape.num_heads, case.shape.head_dim
    q_bytes = B * H * c * D * case.itemsize
    score_bytes = kv_bytes(case, end - policy.n_init, values=False)
    read_bytes = kv_bytes(case, L) + q_bytes
    keys_seen = c * idx.shape[1] + c * (c + 1) // 2
    flops_score = 2 * B * H * max(w, 1) * (end - policy.n_init) * D
    flops_attention = 4 * B * H * D * keys_seen
    return OpBench(
        parts={"score": lambda: policy.vote(f, candidates, call.scale, None),
               "topk": lambda: top_k(vote, policy.k, policy.pool),
               "attention": lambda: indexed_prefill_attention(q, x.k, x.v, rows, col_valid, call.scale, cos, sin,
                                                              call.key_columns),
               "total": total},
        bytes_read={"score": score_bytes, "topk": vote.numel() * 4, "attention": read_bytes,
                    "total": score_bytes + read_bytes},
        flops={"score": flops_score, "attention": flops_attention, "total": flops_score + flops_attention},
        info={"k": policy.k, "keys_read": L, "candidates": end - policy.n_init, "tail": w},
    )


register_op_bench("tokenselect", selection_setup, "TokenSelect (docs/methods.md §1.1): decode hit / miss, prefill chunk")
register_op_bench("hisa", selection_setup, "HISA (docs/methods.md §1.2): block-then-token scoring; decode hit / miss")
register_op_bench("quest", selection_setup, "Quest (docs/methods.md §1.4): page upper-bound scoring; decode hit / miss")
register_op_bench("fasa", selection_setup,
                  "FASA (docs/methods.md §1.3): dominant-frequency-chunk scoring (random dims); decode hit / miss")
