"""Per-model counters: what attention read and what the policy decided."""

from __future__ import annotations

from collections import Counter


class Stats(Counter):
    """Integer counters, summed across layers and steps.

    Common keys: `calls` (attention calls), `dense_calls`, `query_tokens`, `keys_read` (KV tokens
    read, summed over calls and batch rows), `kv_bytes_read` (estimate, K and V). Policies add
    their own, e.g. `selection_hits` / `selection_misses`, `evicted_tokens`.
    """

    def record_read(self, batch: int, queries: int, keys: int, kv_heads: int, head_dim: int, itemsize: int) -> None:
        """Count one attention call that read `keys` KV tokens for `queries` query tokens per row."""
        self["calls"] += 1
        self["query_tokens"] += batch * queries
        self["keys_read"] += batch * keys
        self["kv_bytes_read"] += 2 * batch * keys * kv_heads * head_dim * itemsize

    def summary(self) -> dict:
        """The counters plus derived rates (`keys_read_per_call`, `selection_hit_rate` when known)."""
        out = dict(self)
        if self["calls"]:
            out["keys_read_per_call"] = self["keys_read"] / self["calls"]
        lookups = self["selection_hits"] + self["selection_misses"]
        if lookups:
            out["selection_hit_rate"] = self["selection_hits"] / lookups
        return out
