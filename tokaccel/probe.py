"""Record what the selection policies choose, for analysis scripts and tests.

    with tokaccel.patched(model, "tokenselect:k=256"), record_selections(model) as records:
        model.generate(ids, max_new_tokens=4)
    records[0].layer_idx, records[0].rows  # [B, k'] the chosen cache rows of that selection

One record per selection (a decode step that missed the selection cache, or one prefill chunk),
made where the policy's scorer returns, so the recorded rows are exactly what attention read
besides the sinks and the local window. Nothing is recorded for dense calls.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from .patch import patch_state


@dataclass
class SelectionRecord:
    """One selection of one layer.

    layer_idx: the decoder layer.
    queries: queries in the attention call (1: a decode step; more: a prefill chunk's call).
    scoring_query: [B, H, D] or [B, H, w, D] the queries the scorer voted with (w tail queries),
        as it scored them (un-rotated then rotated at distance n_local in compact mode).
    start, end: the candidates are cache rows [start, end) (sinks before, local window after).
    valid: [B, end - start] bool, which candidates were eligible (None: all).
    query_valid: [B, w] bool, which of w scoring queries voted (None: all).
    rows, rows_valid: [B, k'] chosen cache rows, ascending, and which entries are real.
    scale: the attention scale.
    cached: whether the call read a cache (False under use_cache=False).
    keys: [B, Hk, N, D] the call's keys in the natural head-dim layout, as the cache stores them
        (pre-RoPE in compact mode); only with `record_selections(..., keys=True)`, else None.
    """

    layer_idx: int
    queries: int
    scoring_query: torch.Tensor
    start: int
    end: int
    valid: torch.Tensor | None
    query_valid: torch.Tensor | None
    rows: torch.Tensor
    rows_valid: torch.Tensor
    scale: float
    cached: bool
    keys: torch.Tensor | None = None

    def chosen(self, row: int = 0) -> set[int]:
        """The chosen cache rows of batch row `row` as a set."""
        return set(self.rows[row][self.rows_valid[row]].tolist())


@contextlib.contextmanager
def record_selections(model: torch.nn.Module, keys: bool = False) -> Iterator[list[SelectionRecord]]:
    """Append a SelectionRecord to the yielded list for every selection the model's policy makes
    inside the block. The model must be patched with a selection policy (tokenselect, hisa,
    quest, fasa, ...). keys=True also copies each call's keys (memory: one copy per record)."""
    state = patch_state(model)
    if state is None:
        raise ValueError("record_selections: the model is not patched; use tokaccel.patch_model first")
    records: list[SelectionRecord] = []

    def probe(call, q, start, end, valid, query_valid, rows, rows_valid):
        records.append(SelectionRecord(
            call.ctx.info.layer_idx, call.query.shape[2], q.detach().clone(), start, end,
            None if valid is None else valid.clone(), None if query_valid is None else query_valid.clone(),
            rows.clone(), rows_valid.clone(), call.scale, call.layer is not None,
            call.natural_keys().clone() if keys else None))

    contexts = [ctx for ctx in state.contexts if ctx.policy is not None]
    for ctx in contexts:
        ctx.probes.append(probe)
    try:
        yield records
    finally:
        for ctx in contexts:
            ctx.probes.remove(probe)
