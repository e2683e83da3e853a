"""Tree verification under a selection policy: each node of a draft tree gets what sequential
decoding would have computed there (tokaccel.policies.engine reads sparse rows; this module makes
a tree's S queries read them as S one-token steps would).

generate passes `TreeVerification(tree)` as the `TREE_KWARG` forward kwarg when the patched policy
`verifies_trees`; the policy's attention hands the call back to `TreeVerification.attend`. After
the accepted path was moved into place, `commit_tree` leaves each layer's selection cache as
sequential decoding would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import SelectionLayer
from ..policies.base import LayerContext
from ..policies.dense import dense_with_stats
from ..policies.engine import SelectionCall, SelectionPolicy, attention_scale, natural_key_rows
from ..rope import rotate
from ..selection import SelectionState, assemble, cache_hits
from .trees import TreeTemplate


@dataclass
class TreeVerification:
    """A draft tree handed to a selection policy's attention."""

    tree: TreeTemplate

    def attend(self, policy: SelectionPolicy, ctx: LayerContext, module, query, key, value, attention_mask,
               layer: SelectionLayer | None, q_pre, kwargs: dict):
        """One layer's verify call: query [1, H, S, D] (S tree nodes, rotated at HF's positions),
        key/value [1, Hk, P + S, D] (the nodes last), q_pre the un-rotated query in compact mode
        (None: original positions). Node i at depth d sees the P-token prefix and its own ancestors
        and must get what sequential decoding would have computed there: the selection cache it
        would have had (its parent's), its own selection on a miss, positions 0..P+d in compact
        mode. Per-node states are kept for `commit_tree`. -> (out [1, S, H, D], None)."""
        tree = self.tree
        S, N = query.shape[2], key.shape[-2]
        P = N - S
        if attention_mask is not None and not bool(attention_mask[0, 0, 0, :P].all()):
            raise NotImplementedError(f"{policy.name}: tree verification with padding in the prompt is not supported")
        if policy.n_local <= len(tree.levels):
            raise NotImplementedError(f"{policy.name}: tree verification needs n_local > the tree depth "
                                      f"({len(tree.levels)}), got n_local={policy.n_local}")
        depth = tree.depth.to(query.device)
        if policy.dense_fallback and P + len(tree.levels) + 1 <= policy.budget:  # every node dense: one call
            ctx.state.tree_states = None
            key = natural_key_rows(key, layer)
            if q_pre is not None:
                cos, sin = ctx.state.rope(P + S, query.device, query.dtype)
                positions = torch.cat((torch.arange(P, device=query.device), P + depth))
                key = rotate(key, cos[positions], sin[positions])
                query = rotate(q_pre, cos[P + depth], sin[P + depth])
            return dense_with_stats(ctx, module, query, key, value, attention_mask, **kwargs)
        scale = attention_scale(module, kwargs, query.shape[3])
        call = SelectionCall(policy, ctx, q_pre if q_pre is not None else query, key, value, None, scale, layer,
                             q_pre is not None)
        ctx.stats["sparse_calls"] += 1
        out, ctx.state.tree_states = decode_tree(call, layer.selection if layer is not None else None, tree)
        return out, None


def decode_tree(call: SelectionCall, before: SelectionState | None, tree: TreeTemplate) -> tuple[torch.Tensor, list]:
    """The S queries of a draft tree (batch 1; keys [1, Hk, P + S, D] with the tree's nodes last),
    each decoded as a sequential step over the prefix and its ancestors (rows P + ancestor
    index), starting from the selection state `before`. -> (out [1, S, H, D], selection state
    after each node)."""
    p = call.p
    S, N_all = call.query.shape[2], call.key.shape[-2]
    P = N_all - S
    device = call.query.device
    parent, depth = tree.parent.tolist(), tree.depth.tolist()
    states: list = [None] * S
    outs = []
    for i in range(S):
        path = torch.nonzero(tree.ancestors[i]).flatten().to(device)  # root .. node i
        N = P + depth[i] + 1
        state = before if i == 0 else states[parent[i]]
        if p.dense_fallback and N <= p.budget:
            idx = torch.arange(N, device=device)[None]
            valid = torch.ones_like(idx, dtype=torch.bool)
        else:
            f = call.scoring_query(call.query[:, :, i])  # [1, H, D]
            flat = f.reshape(1, -1).float()
            hit = bool(cache_hits(state, flat, p.theta).all())
            call.ctx.stats["selection_hits" if hit else "selection_misses"] += 1
            if not hit:
                mid, mid_valid = call.select(f, max(N - p.n_local, 0))
                state = SelectionState(flat, mid, mid_valid, torch.full_like(call.first, max(N - p.n_local, 0)))
            idx, valid = assemble(call.first, p.n_init, state.mid, state.mid_valid, state.local_start, N, None)
        states[i] = state
        rows = torch.where(idx < P, idx, P + path[(idx - P).clamp(0, path.numel() - 1)])
        outs.append(call.read_decode(rows, valid, call.query[:, :, i]))
    return torch.cat(outs, dim=1), states


def commit_tree(contexts: list[LayerContext], cache, path: list[int]) -> None:
    """After a verified tree's accepted path (node indices) was moved into place: each layer's
    selection cache becomes the one sequential decoding would have after the path's last node."""
    for ctx in contexts:
        if ctx.policy is None or getattr(ctx.state, "tree_states", None) is None:
            continue
        idx = ctx.info.layer_idx
        layer = cache.layers[idx] if idx < len(cache.layers) else None
        if isinstance(layer, SelectionLayer):
            layer.selection = ctx.state.tree_states[path[-1]]
        ctx.state.tree_states = None
