"""Per-block key summaries kept beside a selection cache (HISA blocks, Quest pages).

A `BlockIndex` summarises cache rows [0, N) in blocks of `block` tokens: the mean key (fp32) and/or
the elementwise max and min key (the keys' dtype), plus the count of real (non-padding) tokens
per block and row. It holds small per-block tensors only, never a copy of K: with D-dim keys
that is 4D (mean) or 2D elementwise bytes x 2 (max/min) per block and KV head.

`update(keys, valid)` is incremental: only the blocks that received new tokens are summarised
again (the last, partial block and the new ones), so a decode step reads at most `block` + 1
keys. A shorter `keys` (an edit the cache layer did not report) rebuilds from scratch. The
summaries are views of buffers with spare capacity, rewritten in place (`put`), so a decode step
copies one block's summaries, not all of them.
"""

from __future__ import annotations

import torch


class BlockIndex:
    """Summaries of blocks of `block` consecutive cache rows: mean [B, Hk, nb, D] fp32 (if
    `with_mean`), kmax / kmin [B, Hk, nb, D] (if `with_bounds`), count [B, nb] int32."""

    def __init__(self, block: int, with_mean: bool, with_bounds: bool):
        self.block, self.with_mean, self.with_bounds = block, with_mean, with_bounds
        self.tokens = 0  # rows summarised
        self.mean = self.kmax = self.kmin = self.count = None
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def num_blocks(self) -> int:
        return 0 if self.count is None else self.count.shape[1]

    def update(self, keys: torch.Tensor, valid: torch.Tensor | None) -> "BlockIndex":
        """Summarise rows [tokens, N) of keys [B, Hk, N, D]; valid [B, N] bool (None: all real)."""
        from .kernels.block_index import block_summaries

        N = keys.shape[2]
        if self.count is not None and (N < self.tokens or self.count.shape[0] != keys.shape[0]):
            self.reset()
        if N == self.tokens and self.count is not None:
            return self
        first = self.tokens // self.block
        mean, kmax, kmin, count = block_summaries(keys, valid, self.block, first)
        return self.put(first, N, mean, kmax, kmin, count)

    def reset(self) -> None:
        self.tokens, self.mean, self.kmax, self.kmin, self.count = 0, None, None, None, None

    def put(self, first: int, tokens: int, mean: torch.Tensor | None, kmax: torch.Tensor | None,
            kmin: torch.Tensor | None, count: torch.Tensor) -> "BlockIndex":
        """Replace the summaries of blocks first.. by mean / kmax / kmin [B, Hk, m, D] and count
        [B, m] (those of rows [first * block, tokens)); the index then covers `tokens` rows."""
        self.mean = self._splice("mean", mean, first, 2) if self.with_mean else None
        self.kmax = self._splice("kmax", kmax, first, 2) if self.with_bounds else None
        self.kmin = self._splice("kmin", kmin, first, 2) if self.with_bounds else None
        self.count = self._splice("count", count, first, 1)
        self.tokens = tokens
        return self

    def _splice(self, name: str, new: torch.Tensor, first: int, dim: int) -> torch.Tensor:
        """A view of buffer `name`: its blocks before `first`, then `new` (blocks first..) along
        `dim`, written in place (the buffer grows by doubling)."""
        size = first + new.shape[dim]
        buf = self._buffers.get(name)
        if buf is None or first == 0 or buf.shape[dim] < size:
            shape = list(new.shape)
            shape[dim] = max(2 * size, 16)
            grown = new.new_empty(shape)
            if first:
                grown.narrow(dim, 0, first).copy_(buf.narrow(dim, 0, first))
            buf = self._buffers[name] = grown
        buf.narrow(dim, first, new.shape[dim]).copy_(new)
        return buf.narrow(dim, 0, size)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mean, self.kmax, self.kmin, self.count)
                   if t is not None)


class CandidateBlocks:
    """The blocks that hold the candidates [start, end) of a selection, for every row.

    first: the first such block id; n: how many (ids first .. first + n - 1);
    token_valid [B, n * block] bool: which rows of those blocks are candidates (row j is cache row
    first * block + j); count [B, n] candidates per block; forced [B, n] bool: the block of each
    row's first candidate (next to the sinks) and of the last one (next to the local window),
    always kept, as HISA keeps its sink and local blocks.
    """

    def __init__(self, start: int, end: int, valid: torch.Tensor | None, block: int, batch: int,
                 device: torch.device):
        self.first = start // block
        self.n = -(-end // block) - self.first
        if valid is None:
            valid = torch.ones(batch, end - start, dtype=torch.bool, device=device)
        before, after = start - self.first * block, (self.first + self.n) * block - end
        self.token_valid = torch.nn.functional.pad(valid, (before, after))
        self.count = self.token_valid.view(batch, self.n, block).sum(-1)
        first_candidate = (before + valid.int().argmax(1)) // block  # [B]
        self.forced = torch.zeros(batch, self.n, dtype=torch.bool, device=device)
        self.forced.scatter_(1, first_candidate[:, None], True)
        self.forced[:, -1] = True
        self.forced &= self.count > 0


def layer_block_index(call, block: int, with_mean: bool, with_bounds: bool) -> BlockIndex:
    """The BlockIndex of the call's cache layer (created on first use, kept on the layer and
    updated with the call's new keys), or a throwaway one when the call has no cache."""
    layer = call.layer
    index = getattr(layer, "block_index", None)
    if not (isinstance(index, BlockIndex) and index.block == block and index.with_mean == with_mean
            and index.with_bounds == with_bounds):
        index = BlockIndex(block, with_mean, with_bounds)
        if layer is not None:
            layer.block_index = index
    return index.update(call.key, call.key_valid)


def count_block_reads(call, blocks: int, bytes_per_block: int) -> None:
    """Account `blocks` block summaries (per batch row, of every KV head) read by stage-1 scoring."""
    B, Hk = call.key.shape[:2]
    call.ctx.stats["scored_blocks"] += B * blocks
    call.ctx.stats["kv_bytes_read"] += B * blocks * Hk * bytes_per_block
