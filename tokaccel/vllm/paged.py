"""Token selection over a paged KV cache (vLLM's CPU layout), with no vLLM import.

vLLM's CPU attention cache, per layer, is `[num_blocks, Hk, block_size, 2 * D]`; viewed as
`[num_blocks, Hk, 2 * block_size, D]` its first half holds keys and the second values. With the
"vec" / "vec16" ISAs (fp32 / fp16, x86 without AMX) a key block is stored dim-major, so the key
cache is `key_cache [num_blocks, Hk, D, block_size]` and the value cache `value_cache
[num_blocks, Hk, block_size, D]` (checked by tests/test_vllm.py against vLLM's own
`cpu_attn_reshape_and_cache`). A sequence of N tokens owns the blocks `blocks [ceil(N / bs)]`
(its block-table row); token t is at block blocks[t // bs], offset t % bs.

`PagedSelector` is one layer's decode-time selection for many sequences: for each sequence it
keeps a `RequestState` (the selection cache of `tokaccel.selection` and, for Quest, page
summaries beside the cache), finds it again by the sequence's first block and checks that it
still describes this sequence (same leading blocks, not longer than the sequence, and the key of
its last summarised token unchanged), so a finished, preempted or recomputed request never
inherits another's selection. Scoring is the tokaccel policy's own (`SelectionCall.select`):
TokenSelect's soft vote over all keys on a selection-cache miss, Quest's page bounds over the
summaries. Attention reads `sinks ∪ selected ∪ local window` rows straight from the paged cache.
Quest with pages equal to cache blocks has a shorter route (`block_row`): the pages
`Quest.page_choice` picks, as cache blocks for vLLM's own kernel, with no token expansion. Keys are the model's rotated keys: positions are the original ones (`position_mode="original"`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blocks import BlockIndex
from ..policies.base import LayerContext, LayerInfo
from ..policies.engine import SelectionCall, SelectionPolicy
from ..selection import SelectionState, assemble, cache_hits, score_rows
from ..stats import Stats

SUPPORTED_POLICIES = ("tokenselect", "quest")
STALE_CALLS = 256  # a request state unused for this many calls of its layer is dropped


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's CPU cache of one layer [num_blocks, Hk, bs, 2 * D] (contiguous) -> views
    (key_cache [num_blocks, Hk, D, bs], value_cache [num_blocks, Hk, bs, D]) in the vec layouts."""
    nb, Hk, bs, D2 = kv_cache.shape
    D = D2 // 2
    block, head = kv_cache.stride(0), kv_cache.stride(1)
    base = kv_cache.storage_offset()
    keys = kv_cache.as_strided((nb, Hk, D, bs), (block, head, bs, 1), base)
    values = kv_cache.as_strided((nb, Hk, bs, D), (block, head, D, 1), base + bs * D)
    return keys, values


def key_rows(key_cache: torch.Tensor, blocks: torch.Tensor, n: int) -> torch.Tensor:
    """The first n keys of a sequence -> [1, Hk, n, D] (a transposed view of one gathered copy).
    key_cache [num_blocks, Hk, D, bs], blocks [>= ceil(n / bs)] long."""
    Hk, D, bs = key_cache.shape[1:]
    nb = -(-n // bs)
    gathered = key_cache.permute(1, 2, 0, 3).index_select(2, blocks[:nb])  # [Hk, D, nb, bs]
    return gathered.reshape(Hk, D, nb * bs)[:, :, :n].transpose(1, 2)[None]


def rows_at(key_cache: torch.Tensor, value_cache: torch.Tensor, blocks: torch.Tensor, idx: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the sequence's tokens idx [L] -> ([1, Hk, L, D], [1, Hk, L, D])."""
    bs = key_cache.shape[3]
    block, offset = blocks[idx // bs], idx % bs
    keys = key_cache[block, :, :, offset]  # [L, Hk, D]: the two index dims lead
    values = value_cache[block, :, offset]  # [L, Hk, D]
    return keys.transpose(0, 1)[None], values.transpose(0, 1)[None]


def key_rows_at(key_cache: torch.Tensor, blocks: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Keys of the sequence's tokens idx [L] -> [1, Hk, L, D]."""
    bs = key_cache.shape[3]
    return key_cache[blocks[idx // bs], :, :, idx % bs].transpose(0, 1)[None]


class VecLayout:
    """vLLM's CPU cache ("vec" / "vec16" ISAs): key_cache [num_blocks, Hk, D, bs] (dim-major),
    value_cache [num_blocks, Hk, bs, D] (`split_kv_cache`)."""

    name = "cpu"
    key_rows = staticmethod(key_rows)
    rows_at = staticmethod(rows_at)
    key_rows_at = staticmethod(key_rows_at)

    @staticmethod
    def key_at(key_cache: torch.Tensor, block: int, offset: int) -> torch.Tensor:
        """[Hk, D] view of the key at `offset` of cache block `block`."""
        return key_cache[block, :, :, offset]

    @staticmethod
    def block_size(key_cache: torch.Tensor) -> int:
        return key_cache.shape[3]

    @staticmethod
    def heads_dim(key_cache: torch.Tensor) -> tuple[int, int]:
        return key_cache.shape[1], key_cache.shape[2]

    @staticmethod
    def block_keys(key_cache: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Keys of whole blocks ids [P] -> [P, Hk, bs, D] (a view of one gathered copy)."""
        return key_cache.index_select(0, ids).transpose(2, 3)


class NHDLayout:
    """vLLM's CUDA cache (Triton / FlashAttention backends): key_cache and value_cache each
    [num_blocks, bs, Hk, D], strided views of one [num_blocks, Hk, bs, 2D] tensor (`split_nhd`)."""

    name = "nhd"

    @staticmethod
    def key_at(key_cache: torch.Tensor, block: int, offset: int) -> torch.Tensor:
        return key_cache[block, offset]

    @staticmethod
    def block_size(key_cache: torch.Tensor) -> int:
        return key_cache.shape[1]

    @staticmethod
    def heads_dim(key_cache: torch.Tensor) -> tuple[int, int]:
        return key_cache.shape[2], key_cache.shape[3]

    @staticmethod
    def key_rows(key_cache: torch.Tensor, blocks: torch.Tensor, n: int) -> torch.Tensor:
        """The first n keys of a sequence -> [1, Hk, n, D]."""
        nb, (bs, Hk, D) = -(-n // key_cache.shape[1]), key_cache.shape[1:]
        return key_cache.index_select(0, blocks[:nb]).reshape(nb * bs, Hk, D)[:n].transpose(0, 1)[None]

    @staticmethod
    def rows_at(key_cache: torch.Tensor, value_cache: torch.Tensor, blocks: torch.Tensor, idx: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        bs = key_cache.shape[1]
        block, offset = blocks[idx // bs], idx % bs
        return key_cache[block, offset].transpose(0, 1)[None], value_cache[block, offset].transpose(0, 1)[None]

    @staticmethod
    def key_rows_at(key_cache: torch.Tensor, blocks: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        bs = key_cache.shape[1]
        return key_cache[blocks[idx // bs], idx % bs].transpose(0, 1)[None]

    @staticmethod
    def block_keys(key_cache: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return key_cache.index_select(0, ids).transpose(1, 2)


def split_nhd(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's CUDA cache of one layer [num_blocks, Hk, bs, 2D] -> views (key_cache, value_cache)
    [num_blocks, bs, Hk, D], as vLLM's Triton backend splits it."""
    return kv_cache.transpose(1, 2).split(kv_cache.shape[-1] // 2, dim=-1)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scale: float
           ) -> torch.Tensor:
    """Attention of q [H, D] over rows keys / values [1, Hk, L, D] where valid [L] -> [H, D]."""
    H, D = q.shape
    Hk = keys.shape[1]
    scores = torch.matmul(q.reshape(Hk, H // Hk, D), keys[0].transpose(1, 2)).float().mul_(scale)  # [Hk, G, L]
    if not bool(valid.all()):
        scores.masked_fill_(~valid, float("-inf"))
    probs = scores.softmax(-1).to(values.dtype)
    return torch.matmul(probs, values[0]).reshape(H, D)


@dataclass
class RequestState:
    """One sequence's selection state in one layer. Also the `layer` a `SelectionCall` is given:
    the engine reads `selection`, `key_columns` and (Quest) `block_index` from it."""

    blocks: torch.Tensor  # [nb] block-table prefix when last updated
    tokens: int  # sequence length when last updated
    fingerprint: torch.Tensor  # [Hk, D] key of token tokens - 1 at that time
    last_call: int
    selection: SelectionState | None = None
    pages: PageSelection | None = None
    page_bounds: PageBounds | None = None
    block_index: BlockIndex | None = None
    key_columns = None  # keys in the natural head-dim order

    def describes(self, layout, key_cache: torch.Tensor, blocks: torch.Tensor, n: int) -> bool:
        """Whether this state belongs to the sequence of n tokens in `blocks` (not another request
        that now holds the same blocks, nor this one recomputed differently after preemption)."""
        m = self.blocks.shape[0]
        if self.tokens == 0 or n < self.tokens or blocks.shape[0] < m or not torch.equal(blocks[:m], self.blocks):
            return False
        return torch.equal(last_key(layout, key_cache, blocks, self.tokens), self.fingerprint)


def last_key(layout, key_cache: torch.Tensor, blocks: torch.Tensor, n: int) -> torch.Tensor:
    """[Hk, D] view of the key of token n - 1."""
    bs = layout.block_size(key_cache)
    return layout.key_at(key_cache, int(blocks[(n - 1) // bs]), (n - 1) % bs)


@dataclass
class PageSelection:
    """A whole-block selection (`PagedSelector.block_row`): the scoring query that made it
    query [1, F] fp32, the chosen candidate blocks pages [M] long (the sequence's block numbers,
    not cache block ids) and the local window's start then."""

    query: torch.Tensor
    pages: torch.Tensor
    local_start: int


@dataclass
class PageBounds:
    """Quest's summaries of a sequence's whole blocks, kept beside the paged cache for
    `PagedSelector.block_row`: bounds [Hk, 2D, capacity] fp32, column p block p's elementwise max
    key (rows :D) over its min key (rows D:), dim-major so that scoring multiplies by contiguous
    rows; tokens: the sequence length summarised."""

    bounds: torch.Tensor
    tokens: int = 0


class PagedSelector:
    """Decode-time selection of one attention layer over a paged KV cache, for many sequences.

    `decode(q, key_cache, value_cache, blocks, n)` -> [H, D]: attention of the query q [H, D] of a
    sequence of n tokens (the query's own key already in the cache) over `sinks ∪ selected ∪
    local window`. The caches are in `layout` (VecLayout: vLLM's CPU one; NHDLayout: its CUDA one).
    Stats (hits, misses, keys read) accumulate in `self.ctx.stats`.
    """

    def __init__(self, policy: SelectionPolicy, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, layout=VecLayout):
        if policy.name not in SUPPORTED_POLICIES:
            raise ValueError(f"tokaccel.vllm supports the policies {SUPPORTED_POLICIES}, got {policy.name!r}")
        if policy.position_mode != "original":
            raise ValueError("tokaccel.vllm: vLLM caches rotated keys; the policy needs position_mode='original'")
        info = LayerInfo(layer_idx, num_heads, num_kv_heads, head_dim, None, "full_attention")
        self.policy, self.scale, self.layout = policy, float(scale), layout
        self.ctx = LayerContext(info, policy, Stats(), state=policy.standalone_state(info, None))
        self.active = policy.applies_to(info)
        self.page = getattr(policy, "page", None) if policy.name == "quest" else None
        self.requests: dict[int, list[RequestState]] = {}  # first block id -> states
        self.calls = 0

    def is_sparse(self, n: int) -> bool:
        """Whether a decode step over n tokens reads a selection (else the parent backend attends)."""
        return self.active and (not self.policy.dense_fallback or n > self.policy.budget)

    # -- request states --------------------------------------------------------------------------
    def state_for(self, key_cache: torch.Tensor, blocks: torch.Tensor, n: int) -> RequestState:
        """The sequence's state, or a fresh one (replacing any stale state on its first block)."""
        states = self.requests.setdefault(int(blocks[0]), [])
        for state in states:
            if state.describes(self.layout, key_cache, blocks, n):
                state.last_call = self.calls
                return state
        states[:] = [s for s in states if self.calls - s.last_call < 2]  # another live sequence sharing block 0
        state = RequestState(blocks[:0].clone(), 0, key_cache.new_zeros(0), self.calls)
        states.append(state)
        return state

    def prune(self) -> None:
        """Drop states of sequences not seen for STALE_CALLS calls (finished or preempted)."""
        for first in [f for f, states in self.requests.items()
                      if all(self.calls - s.last_call >= STALE_CALLS for s in states)]:
            del self.requests[first]

    def _remember(self, state: RequestState, key_cache: torch.Tensor, blocks: torch.Tensor, n: int) -> None:
        bs = self.layout.block_size(key_cache)
        state.blocks, state.tokens = blocks[:-(-n // bs)].clone(), n
        state.fingerprint = last_key(self.layout, key_cache, blocks, n).clone()

    def _update_pages(self, state: RequestState, key_cache: torch.Tensor, blocks: torch.Tensor, n: int
                      ) -> BlockIndex:
        """Quest's page max / min (`BlockIndex`) brought to n tokens: only the pages that received
        tokens since the last update are summarised again, read from the paged cache (pages equal
        to cache blocks: whole blocks at once; other page sizes: token rows)."""
        index = state.block_index
        if index is None or index.tokens > n:
            index = state.block_index = BlockIndex(self.page, with_mean=False, with_bounds=True)
        if index.tokens == n:
            return index
        first = index.tokens // self.page
        if self.page == self.layout.block_size(key_cache):
            kmax, kmin, count = block_bounds(self.layout, key_cache, blocks, first, n)
        else:
            from ..kernels.block_index import block_summaries

            idx = torch.arange(first * self.page, n, device=blocks.device)
            keys = self.layout.key_rows_at(key_cache, blocks, idx).contiguous()
            _, kmax, kmin, count = block_summaries(keys, None, self.page, 0)
        return index.put(first, n, None, kmax, kmin, count)

    def _selection(self, state: RequestState, q: torch.Tensor, key_cache: torch.Tensor, blocks: torch.Tensor,
                   n: int) -> SelectionState:
        """The sequence's selection for the query q [H, D]: the cached one while it hits, else the
        policy's scorer on [n_init, n - n_local)."""
        p, stats = self.policy, self.ctx.stats
        query = q[None]  # [1, H, D]
        flat = query.reshape(1, -1).to(torch.float32, copy=True)  # kept: q's buffer may be reused
        if self.page is not None:
            self._update_pages(state, key_cache, blocks, n)
        hit = bool(cache_hits(state.selection, flat, p.theta)[0])
        stats["selection_hits" if hit else "selection_misses"] += 1
        if not hit:
            local = max(n - p.n_local, 0)
            if self.page is not None:  # Quest scores page summaries only: the call's keys are a shape
                keys = key_cache.new_empty(1, self.layout.heads_dim(key_cache)[0], 1,
                                           self.layout.heads_dim(key_cache)[1]).expand(-1, -1, n, -1)
            else:
                keys = self.layout.key_rows(key_cache, blocks, n)
            call = SelectionCall(p, self.ctx, query[:, :, None], keys, None, None, self.scale, state, compact=False)
            mid, mid_valid = call.select(query, local)
            start = torch.full((1,), local, dtype=torch.long, device=q.device)
            state.selection = SelectionState(flat, mid, mid_valid, start)
        return state.selection

    # -- decode ----------------------------------------------------------------------------------
    def indices(self, q: torch.Tensor, key_cache: torch.Tensor, blocks: torch.Tensor, n: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token positions [L] the query q [H, D] of a sequence of n tokens reads: sinks, selected,
        local window; valid [L] bool). Updates the sequence's state and the read counters."""
        state = self.state_for(key_cache, blocks, n)
        selection = self._selection(state, q, key_cache, blocks, n)
        first = torch.zeros(1, dtype=torch.long, device=q.device)
        idx, valid = assemble(first, self.policy.n_init, selection.mid, selection.mid_valid, selection.local_start, n,
                              None)
        Hk, D = self.layout.heads_dim(key_cache)
        self.ctx.stats.record_read(1, 1, idx.shape[1], Hk, D, key_cache.element_size())
        self._remember(state, key_cache, blocks, n)
        return idx[0], valid[0]

    def decode(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, blocks: torch.Tensor,
               n: int) -> torch.Tensor:
        idx, valid = self.indices(q, key_cache, blocks, n)
        keys, values = self.layout.rows_at(key_cache, value_cache, blocks, idx)
        return attend(q, keys, values, valid, self.scale)

    def reads_blocks(self, block_size: int) -> bool:
        """Whether selections are whole cache blocks (Quest with page = block size): then
        `block_row` gives a shorter block table and vLLM's own kernel attends over it."""
        return self.page == block_size

    def block_row(self, q: torch.Tensor, key_cache: torch.Tensor, blocks: torch.Tensor, n: int
                  ) -> tuple[torch.Tensor, int]:
        """(the blocks to read [M] in sequence order, ending with the sequence's last block; the
        tokens they hold): the sink blocks, the pages Quest chose and the blocks of the local window
        (the window's first block read whole). Every block but the last is full."""
        p, bs, stats = self.policy, self.layout.block_size(key_cache), self.ctx.stats
        state = self.state_for(key_cache, blocks, n)
        bounds = self._update_bounds(state, key_cache, blocks, n)
        flat = q.reshape(1, -1).to(torch.float32, copy=True)
        if p.theta >= 1:  # only an identical query reuses the selection: no similarity needed
            hit = state.pages is not None and torch.equal(flat, state.pages.query)
        else:
            hit = bool(cache_hits(state.pages, flat, p.theta)[0])
        stats["selection_hits" if hit else "selection_misses"] += 1
        if not hit:
            local = max(n - p.n_local, 0)
            state.pages = PageSelection(flat, self._choose_pages(q, bounds, local), local)
        last = (n - 1) // bs
        read = torch.zeros(last + 1, dtype=torch.bool, device=blocks.device)
        read[: -(-p.n_init // bs)] = True
        read[state.pages.pages] = True
        read[min(state.pages.local_start, n - 1) // bs:] = True
        logical = read.nonzero()[:, 0]
        tokens = (logical.shape[0] - 1) * bs + n - last * bs
        stats.record_read(1, 1, tokens, bounds.shape[0], q.shape[-1], key_cache.element_size())
        self._remember(state, key_cache, blocks, n)
        return blocks[logical], tokens

    def _update_bounds(self, state: RequestState, key_cache: torch.Tensor, blocks: torch.Tensor, n: int
                       ) -> torch.Tensor:
        """The sequence's page bounds [Hk, 2D, ceil(n / bs)] (`PageBounds`) brought to n tokens:
        only the blocks that received tokens since the last update are summarised again."""
        bs, nb = self.page, -(-n // self.page)
        pb = state.page_bounds
        if pb is None or pb.tokens > n:
            Hk, D = self.layout.heads_dim(key_cache)
            pb = state.page_bounds = PageBounds(torch.empty(Hk, 2 * D, max(2 * nb, 16), device=key_cache.device))
        if pb.tokens < n:
            first = pb.tokens // bs
            if nb > pb.bounds.shape[2]:
                grown = pb.bounds.new_empty(*pb.bounds.shape[:2], 2 * nb)
                grown[:, :, :first] = pb.bounds[:, :, :first]
                pb.bounds = grown
            kmax, kmin, _ = block_bounds(self.layout, key_cache, blocks, first, n)  # [1, Hk, P, D]
            D = kmax.shape[-1]
            pb.bounds[:, :D, first:nb] = kmax[0].transpose(1, 2)
            pb.bounds[:, D:, first:nb] = kmin[0].transpose(1, 2)
            pb.tokens = n
        return pb.bounds[:, :, :nb]

    def _choose_pages(self, q: torch.Tensor, bounds: torch.Tensor, end: int) -> torch.Tensor:
        """The blocks [M] long Quest reads whole for the query q [H, D] among the candidates
        [n_init, end), given the page bounds [Hk, 2D, nb]: the pages `Quest.page_choice` picks
        (`CandidateBlocks` of one row: the first and last candidate blocks forced, then the best
        by bound while the candidates total <= k). Every middle candidate is a full block, so
        that is the forced pages and the top (k - forced tokens) // bs by the same bound scores,
        with no sort or cumulative count. (This path serves vLLM's CPU backend only: the torch
        bound is called directly, without the kernel dispatch.)"""
        from ..kernels.block_index import block_bound_scores_reference as block_bound_scores

        p, bs = self.policy, self.page
        start = p.n_init
        if end <= start:
            return torch.zeros(0, dtype=torch.long, device=q.device)
        first, last = start // bs, (end - 1) // bs
        Hk, D2, _ = bounds.shape
        self.ctx.stats["scored_blocks"] += last + 1 - first
        self.ctx.stats["kv_bytes_read"] += (last + 1 - first) * Hk * D2 * bounds.element_size()
        forced_tokens = (first + 1) * bs - start + end - last * bs if last > first else end - start
        if p.head_vote != "max" or forced_tokens > p.k:
            return self._page_choice(q, bounds, start, end, first, last)
        ends = [first] if last == first else [first, last]
        middle = min((p.k - forced_tokens) // bs, last - first - 1)
        if middle <= 0:
            return torch.tensor(ends, device=q.device)
        rows, _ = score_rows(q[None], Hk, p.head_mapping, None)
        span = bounds[:, :, first:last + 1].transpose(1, 2)[None]  # [1, Hk, pages, 2D]
        score = block_bound_scores(rows, span[..., :D2 // 2], span[..., D2 // 2:], self.scale)[0].amax(0)
        top = score[1:-1].topk(middle, sorted=False).indices + (first + 1)
        return torch.cat((torch.tensor(ends, device=q.device), top))

    def _page_choice(self, q: torch.Tensor, bounds: torch.Tensor, start: int, end: int, first: int, last: int
                     ) -> torch.Tensor:
        """`_choose_pages` in general: `Quest.page_choice` itself on the candidate blocks."""
        from ..blocks import CandidateBlocks

        Hk, D = bounds.shape[0], bounds.shape[1] // 2
        cand = CandidateBlocks(start, end, None, self.page, 1, q.device)
        rows, weights = score_rows(q[None], Hk, self.policy.head_mapping, None)
        span = bounds[:, :, first:last + 1].transpose(1, 2)[None]  # [1, Hk, pages, 2D]
        chosen = self.policy.page_choice(rows, weights, span[..., :D], span[..., D:], self.scale, cand.count,
                                         cand.forced)
        return chosen[0].nonzero()[:, 0] + first


def block_bounds(layout, key_cache: torch.Tensor, blocks: torch.Tensor, first: int, n: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elementwise max / min keys [1, Hk, P, D] and token counts [1, P] int32 of the sequence's
    blocks first.. (P blocks up to token n), read whole from the cache."""
    bs = layout.block_size(key_cache)
    nb = -(-n // bs)
    keys = layout.block_keys(key_cache, blocks[first:nb])  # [P, Hk, bs, D]
    filled = n - (nb - 1) * bs
    if filled < bs:  # the last block: only its first `filled` tokens are the sequence's
        keys[-1, :, filled:] = keys[-1, :, :1]
    kmax, kmin = keys.amax(2), keys.amin(2)  # [P, Hk, D]
    count = torch.full((1, nb - first), bs, dtype=torch.int32, device=keys.device)
    count[0, -1] = filled
    return kmax.transpose(0, 1)[None], kmin.transpose(0, 1)[None], count
