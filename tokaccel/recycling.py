"""Token Recycling (arXiv 2408.08696): train-free speculative decoding, token-identical to greedy.

    import tokaccel.recycling
    out = model.generate(**inputs, max_new_tokens=128, custom_generate=tokaccel.recycling.generate)

Each step drafts a static tree of tokens from an adjacency matrix `A [V, 8]` (the top-8 next
tokens last seen after each token), verifies the whole tree in one forward (a 4-D mask lets each
node see the cache and its own ancestors; position = cache length + depth), accepts the longest
path the model's own argmax agrees with, plus one bonus token, and moves the accepted path's KV
into place. Every node's logits then refresh `A` ("recycling" the candidates greedy decoding
throws away). The matrix lives on the model between calls (hot start); see `recycling_state`.

How many drafted tokens pay off depends on the device: a verify forward of n tokens must cost less
than the tokens it accepts. `tree="auto"` (default) picks, step by step, the size among nested
sub-trees of the paper's 80-node tree that maximises measured (accepted + 1) / step time, with
plain one-token steps as a candidate, so it never settles on something slower than greedy.

On CPU, pack the model's linears first (`tokaccel.pack_linears(model)`, see `tokaccel.cpu_linear`):
unpacked, a verify forward of 8 tokens costs 1.5-1.8x a one-token step (each small-M matmul repacks
its weight), so trees rarely pay; packed, it costs ~1.0x. `generate` warns once when a large CPU
model is not packed.

Lossless up to floating point: a tree forward computes the same logits as one-token steps only to
rounding (fp32: ~1e-5), so an exact argmax tie can in principle break differently.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .cache import cache_kwarg, call_cache
from .cpu_linear import available as packing_available
from .cpu_linear import packed_count
from .patch import patch_state
from .policies.base import TREE_KWARG

SLOTS = 8  # candidates kept per token (columns of A)

# The paper's default tree (80 drafted nodes, depth 6; levels 8/21/25/15/8/3). A path lists, from
# the root, which of the parent token's A-slots each level takes.
PAPER_TREE = (
    [(s,) for s in range(8)]
    + [(0, s) for s in range(8)] + [(1, s) for s in range(4)] + [(2, s) for s in range(3)]
    + [(3, 0), (3, 1), (4, 0), (5, 0), (6, 0), (7, 0)]
    + [(0, 0, s) for s in range(8)] + [(0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1)]
    + [(0, s, 0) for s in range(3, 8)] + [(1, 0, 0), (1, 0, 1), (1, 1, 0)] + [(s, 0, 0) for s in range(2, 6)]
    + [(0, 0, 0, s) for s in range(5)] + [(0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 2, 0), (0, 0, 3, 0), (0, 0, 4, 0)]
    + [(0, 1, 0, 0), (0, 2, 0, 0)] + [(s, 0, 0, 0) for s in range(1, 4)]
    + [(0, 0, 0, 0, s) for s in range(3)] + [(0, 0, 0, 1, 0), (0, 0, 0, 2, 0), (0, 0, 1, 0, 0), (0, 1, 0, 0, 0),
                                             (1, 0, 0, 0, 0)]
    + [(0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0)]
)

# Sizes `tree="auto"` chooses among: nested prefixes of PAPER_TREE in `_priority` order (0 = plain
# one-token steps). No 1- or 2-node trees: on CPU a 2- or 3-row matmul is slower than a 4-row one
# (torch 2.13, SmolLM2's lm_head: 15 / 22 ms for 2 / 3 rows, 12 ms for 4).
AUTO_SIZES = (0, 3, 4, 6, 8, 12, 16, 24, 32, 48, 80)


def _priority(path: tuple[int, ...]) -> float:
    """A prior on how often a node is accepted: lower slots and shallower nodes first. Any order
    in which a node follows its parent makes every prefix a valid tree (its score is lower)."""
    return math.prod(0.8 / (1 + 0.6 * s) for s in path)


class TreeTemplate:
    """A static draft tree. Node 0 is the root (the last accepted token, not yet in the cache);
    node i >= 1 follows `paths[i - 1]`. Nodes are stored in BFS order (depth, then given order).

    parent [n+1] (root: 0), depth [n+1], slot [n+1] (root: 0), ancestors [n+1, n+1] bool
    (ancestors[i, j]: j is i or an ancestor of i), levels: index tensors of the nodes per depth >= 1,
    rank [n+1]: the node's position in the order the paths were given (root: -1).
    """

    def __init__(self, paths):
        paths = [tuple(int(s) for s in p) for p in paths]
        if len(set(paths)) != len(paths):
            raise ValueError("tree template: duplicate paths")
        known = set(paths)
        for p in paths:
            if not p:
                raise ValueError("tree template: empty path (the root is implicit)")
            if any(not 0 <= s < SLOTS for s in p):
                raise ValueError(f"tree template: path {p} uses a slot outside [0, {SLOTS})")
            if len(p) > 1 and p[:-1] not in known:
                raise ValueError(f"tree template: path {p} has no parent {p[:-1]} in the template")
        given = {p: i for i, p in enumerate(paths)}
        self.paths = sorted(paths, key=lambda p: (len(p), given[p]))
        index = {p: i + 1 for i, p in enumerate(self.paths)}
        n = len(self.paths) + 1
        self.parent = torch.tensor([0] + [index.get(p[:-1], 0) for p in self.paths])
        self.depth = torch.tensor([0] + [len(p) for p in self.paths])
        self.slot = torch.tensor([0] + [p[-1] for p in self.paths])
        self.rank = torch.tensor([-1] + [given[p] for p in self.paths])
        anc = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            anc[i] |= anc[int(self.parent[i])]
        self.ancestors = anc
        self.levels = [torch.nonzero(self.depth == d).flatten() for d in range(1, int(self.depth.max()) + 1)]

    @property
    def size(self) -> int:
        """Drafted nodes (the root excluded)."""
        return len(self.paths)

    def __repr__(self):
        return f"TreeTemplate({self.size} nodes, depth {len(self.levels)})"


def nested_trees(paths=PAPER_TREE, sizes=AUTO_SIZES) -> dict[int, TreeTemplate]:
    """Sub-trees of `paths` with the `sizes` most likely nodes (by `_priority`), each containing
    the smaller ones. Node ranks (TreeTemplate.rank) are positions in that priority order."""
    ordered = sorted(paths, key=lambda p: (-_priority(p), len(p), p))
    return {m: TreeTemplate(ordered[:m]) for m in sizes if 0 < m <= len(ordered)}


# ---------------------------------------------------------------------------------------- matrix
class Adjacency:
    """A [V, 8] int32: the top-8 next tokens last seen after each token. A row that has never been
    written holds token 0 (drafts from it are wasted, never wrong: acceptance checks the model)."""

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu", table: torch.Tensor | None = None):
        if table is None:
            table = torch.zeros(vocab_size, SLOTS, dtype=torch.int32, device=device)
        if table.dtype != torch.int32 or table.dim() != 2 or table.shape[1] != SLOTS:
            raise ValueError(f"adjacency table must be int32 [V, {SLOTS}], got {table.dtype} {tuple(table.shape)}")
        self.table = table

    @property
    def vocab_size(self) -> int:
        return self.table.shape[0]

    def save(self, path: str | os.PathLike) -> None:
        torch.save({"format": "tokaccel.recycling.Adjacency/1", "table": self.table.cpu()}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "Adjacency":
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != "tokaccel.recycling.Adjacency/1":
            raise ValueError(f"{path}: not a tokaccel adjacency file (written by Adjacency.save)")
        return cls(data["table"].shape[0], table=data["table"].to(device))


def draft_tree(table: torch.Tensor, root: torch.Tensor, tree: TreeTemplate) -> torch.Tensor:
    """Tokens [n+1] (long) of the tree rooted at token `root` (0-d): node i = A[token of parent, slot]."""
    from .kernels.recycling import tree_draft

    return tree_draft(table, root.reshape(1), tree.parent.to(table.device), tree.slot.to(table.device),
                      tree.depth.to(table.device), len(tree.levels))[0]


def seed_from_sequence(table: torch.Tensor, tokens: torch.Tensor) -> None:
    """For each token of `tokens` [L] followed by another, put that follower first in its row
    (the other candidates shift right); the last occurrence of a repeated token wins. Lets drafts
    copy spans of the prompt, as prompt lookup decoding does."""
    if tokens.numel() < 2:
        return
    rows, nxt = tokens[:-1], tokens[1:]
    order = torch.arange(rows.numel(), device=tokens.device)
    last = torch.full((table.shape[0],), -1, dtype=torch.long, device=tokens.device)
    last.scatter_reduce_(0, rows, order, reduce="amax")
    pick = last[rows] == order  # the last occurrence of each token
    rows, nxt = rows[pick], nxt[pick]
    current = table[rows]
    table[rows] = torch.cat((nxt[:, None].to(table.dtype), current[:, :-1]), dim=1)


def _update_priority(tree: TreeTemplate, on_path: torch.Tensor) -> torch.Tensor:
    """[n+1] order in which duplicate tokens' rows are written (lowest wins): the accepted path wins,
    its deepest node first (the latest occurrence, as sequential decoding would leave it), then the
    rest in BFS order."""
    n = tree.size + 1
    order = torch.arange(n, device=on_path.device)
    return torch.where(on_path, -1 - tree.depth.to(on_path.device), order)


def update_adjacency(table: torch.Tensor, tokens: torch.Tensor, logits: torch.Tensor, priority: torch.Tensor) -> None:
    """A[tokens[i]] = top-8 of logits[i] [n, V] for each node i whose token no node with a lower
    `priority` also holds (one write per distinct token, no host sync)."""
    from .kernels.recycling import adjacency_update

    same = tokens[:, None] == tokens[None, :]
    beaten = (same & (priority[None, :] < priority[:, None])).any(-1)
    adjacency_update(table, tokens, logits, ~beaten)


# ---------------------------------------------------------------------------------------- masks
def _tree_mask(tree: TreeTemplate, prefix_valid: torch.Tensor, device) -> torch.Tensor:
    """[1, 1, n+1, P+n+1] bool: every node sees the valid prefix and its own ancestors."""
    n = tree.size + 1
    P = prefix_valid.shape[0]
    mask = torch.empty(1, 1, n, P + n, dtype=torch.bool, device=device)
    mask[0, 0, :, :P] = prefix_valid
    mask[0, 0, :, P:] = tree.ancestors.to(device)
    return mask


def _sliding_tree_mask(tree: TreeTemplate, seen: int, window: int, prefix_valid: torch.Tensor, device) -> torch.Tensor:
    """The mask of a sliding-window layer that keeps min(seen, window - 1) of `seen` tokens: node
    at depth d (cache index seen + d) sees key index j iff seen + d - j < window (HF's rule)."""
    kept = min(seen, window - 1)
    n = tree.size + 1
    mask = torch.empty(1, 1, n, kept + n, dtype=torch.bool, device=device)
    key_index = torch.arange(seen - kept, seen, device=device)
    query_index = seen + tree.depth.to(device)
    mask[0, 0, :, :kept] = (query_index[:, None] - key_index[None, :] < window) & prefix_valid[seen - kept:]
    mask[0, 0, :, kept:] = tree.ancestors.to(device)
    return mask


# ---------------------------------------------------------------------------------------- attention
def _tree_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """HF's SDPA attention, except that a masked call with several queries under GQA runs on the
    KV heads (queries of a group stacked, mask repeated) instead of materialising repeated K/V,
    which on CPU cost more than the attention itself (1.4 of 1.6 ms per SmolLM2 layer at 1K)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, S, D = query.shape
    Hk = key.shape[1]
    if attention_mask is None or S == 1 or H == Hk or dropout or kwargs.get("s_aux") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    G = H // Hk
    mask = attention_mask[:, :, :, : key.shape[-2]]
    q = query.reshape(B, Hk, G * S, D)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask.repeat(1, 1, G, 1), scale=scaling)
    return out.reshape(B, H, S, D).transpose(1, 2).contiguous(), None


_TREE_SDPA = "tokaccel_tree_sdpa"


def _attention_configs(model) -> list:
    configs = {}
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "config") and "Attention" in type(module).__name__:
            configs[id(module.config)] = module.config
    return list(configs.values())


class _TreeAttention:
    """Context manager: decoder configs that use "sdpa" switch to `_tree_sdpa` (registered under
    "tokaccel_tree_sdpa" in AttentionInterface on first use); others (eager, flash, a tokaccel
    policy) are left alone."""

    _registered = False

    def __init__(self, model):
        self.configs = [c for c in _attention_configs(model) if c._attn_implementation == "sdpa"]

    def __enter__(self):
        if self.configs and not _TreeAttention._registered:
            from transformers import AttentionInterface

            AttentionInterface.register(_TREE_SDPA, _tree_sdpa)
            _TreeAttention._registered = True
        for c in self.configs:
            c._attn_implementation_internal = _TREE_SDPA

    def __exit__(self, *exc):
        for c in self.configs:
            c._attn_implementation_internal = "sdpa"


# ---------------------------------------------------------------------------------------- state
@dataclass
class RecyclingStats:
    """Counters over every generate call since the state was created (or `reset_stats`)."""

    steps: int = 0
    tree_steps: int = 0  # steps that verified a drafted tree (the others were plain one-token steps)
    drafted: int = 0
    accepted: int = 0  # drafted tokens accepted
    emitted: int = 0  # tokens produced (accepted + bonus)
    sizes: dict = field(default_factory=dict)  # tree size -> steps

    def summary(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "sizes"}
        out["sizes"] = dict(sorted(self.sizes.items()))
        out["mean_accepted_per_step"] = self.emitted / self.steps if self.steps else 0.0
        out["acceptance_rate"] = self.accepted / self.drafted if self.drafted else 0.0
        return out


class TreeChooser:
    """Picks the tree size of each step among nested sub-trees: argmax of (accepted + 1) / time.

    `accepted[m]`: running mean of drafted tokens accepted with the m-node sub-tree. One verify of
    the M-node tree tells how many every sub-tree m <= M would have accepted, so all of them are
    updated at once. `seconds[m]`: running mean of a step's wall time (seeded by `calibrate`).
    Sizes above the current choice go stale (but never below a sub-tree's estimate); every
    `probe_every` steps the cheapest larger size runs (4x as rarely while plain steps are best, so
    a prompt nothing can be drafted for pays ~2%), so a matrix that warms up is noticed.
    """

    def __init__(self, sizes, seconds: dict[int, float], probe_every: int = 8, decay: float = 0.3):
        self.sizes = sorted(sizes)
        self.seconds = dict(seconds)
        self.accepted = {m: (1.0 if m else 0.0) for m in self.sizes}  # optimistic until measured
        self.probe_every, self.decay = probe_every, decay
        self.steps = 0
        self.probes = 0  # steps that ran a size above the best (for tests and stats)

    def best(self) -> int:
        return max(self.sizes, key=lambda m: (1.0 + self.accepted[m]) / self.seconds[m])

    def pick(self) -> int:
        self.steps += 1
        best = self.best()
        larger = self.sizes[self.sizes.index(best) + 1:]
        every = self.probe_every if best else 4 * self.probe_every
        if self.steps % every == 0 and larger:
            self.probes += 1
            return min(reversed(larger), key=lambda m: self.seconds[m])
        return best

    def observe(self, size: int, accepted_by_size: dict[int, int], seconds: float) -> None:
        a = self.decay
        before = self.accepted[size]
        for m, acc in accepted_by_size.items():
            self.accepted[m] += a * (acc - self.accepted[m])
        for m in self.sizes:
            if m > size:  # unmeasured: at least the sub-tree's estimate, and the margin above it shrinks
                margin = max(self.accepted[m] - before, 0.0)
                self.accepted[m] = self.accepted[size] + (1 - a) * margin
        self.seconds[size] += a * (seconds - self.seconds[size])

    def new_sequence(self) -> None:
        """A new prompt: keep timings, cap acceptance estimates from the last one at 0.6 tokens
        (another kind of text may accept nothing; a step or two re-measures it)."""
        for m in self.sizes:
            self.accepted[m] = min(self.accepted[m], 0.6)


@dataclass
class RecyclingState:
    """What persists on a model between generate calls: the matrix (hot start), the tree chooser
    and counters. `tokaccel.recycling.recycling_state(model)` returns it; `reset(model)` drops it."""

    adjacency: Adjacency
    chooser: TreeChooser | None = None
    stats: RecyclingStats = field(default_factory=RecyclingStats)


_STATE_ATTR = "_tokaccel_recycling"


def recycling_state(model) -> RecyclingState | None:
    return model.__dict__.get(_STATE_ATTR)


def set_recycling_state(model, state: RecyclingState | None) -> None:
    """Give the model this hot-start state (None: start cold), e.g. to keep one per variant."""
    if state is None:
        model.__dict__.pop(_STATE_ATTR, None)
    else:
        model.__dict__[_STATE_ATTR] = state


def reset(model) -> None:
    """Forget the model's adjacency matrix, tree timings and counters (the next call starts cold)."""
    model.__dict__.pop(_STATE_ATTR, None)


# ---------------------------------------------------------------------------------------- calibration
def _calibration_file() -> Path:
    root = os.environ.get("TOKACCEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tokaccel")
    return Path(root) / "recycling_calibration.json"


def _calibration_key(model, device) -> str:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    dtype = next(model.parameters()).dtype
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    patch = patch_state(model)
    policy = str(patch.policy) if patch is not None else "unpatched"
    return (f"{name}|{policy}|{type(model).__name__}|L{cfg.num_hidden_layers}|H{cfg.hidden_size}|V{cfg.vocab_size}|"
            f"{device.type}|{str(dtype).replace('torch.', '')}|threads{torch.get_num_threads()}|"
            f"packed{packed_count(model)}")


@torch.no_grad()
def calibrate(model, cache, context_len: int, sizes=AUTO_SIZES, trees=None, repeats: int = 3,
              tree_kwargs=lambda tree: {}) -> dict[int, float]:
    """Seconds of one verify forward per tree size, measured on `cache` (left as it was), median
    of `repeats`. Results are cached per (model, device, dtype, threads, packed linears) in
    ~/.cache/tokaccel/recycling_calibration.json (TOKACCEL_CACHE overrides the folder)."""
    device = next(model.parameters()).device
    path, key = _calibration_file(), _calibration_key(model, device)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    if key in saved and all(str(m) in saved[key] for m in sizes):
        return {m: float(saved[key][str(m)]) for m in sizes}
    trees = trees or nested_trees(sizes=sizes)
    name = cache_kwarg(model)
    valid = torch.ones(context_len, dtype=torch.bool, device=device)
    seconds = {}
    with _TreeAttention(model):
        for m in sizes:
            tree = trees.get(m)
            n = tree.size + 1 if tree else 1
            ids = torch.zeros(1, n, dtype=torch.long, device=device)
            pos = (context_len + (tree.depth if tree else torch.zeros(1, dtype=torch.long)))[None].to(device)
            mask = _masks(model, tree, cache, context_len, valid, device) if tree else None
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True, **{name: cache},
                      **(tree_kwargs(tree) if tree else {}))
                times.append(time.perf_counter() - start)
                cache.crop(-n)
            seconds[m] = sorted(times[1:])[len(times[1:]) // 2]
    saved[key] = {str(m): s for m, s in seconds.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved, indent=1))
    except OSError:
        pass
    return seconds


def _layer_types(model) -> list[str] | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "layer_types", None)


def _masks(model, tree: TreeTemplate, cache, seen: int, prefix_valid: torch.Tensor, device):
    """The verify forward's attention mask: one tensor, or per layer type for hybrid models."""
    sliding = [layer for layer in cache.layers if getattr(layer, "is_sliding", False)]
    if not sliding:
        return _tree_mask(tree, prefix_valid, device)
    windows = {layer.sliding_window for layer in sliding}
    if len(windows) != 1:
        raise NotImplementedError("token recycling: sliding-window layers with different windows are not supported")
    window_mask = _sliding_tree_mask(tree, seen, windows.pop(), prefix_valid, device)
    if len(sliding) == len(cache.layers):  # e.g. Mistral: one sliding window for every layer
        return window_mask
    types = _layer_types(model)
    if not types:
        raise NotImplementedError("token recycling: a model mixing sliding and full layers without "
                                  "`config.layer_types` is not supported")
    masks = {t: _tree_mask(tree, prefix_valid, device) for t in set(types) if t != "sliding_attention"}
    masks["sliding_attention"] = window_mask
    return masks


# ---------------------------------------------------------------------------------------- decoding
def _check(model, input_ids, generation_config, cache):
    if generation_config is not None:
        if generation_config.do_sample:
            raise ValueError("token recycling is lossless only for greedy decoding; call generate with "
                             "do_sample=False (sampling is not supported)")
        if (generation_config.num_beams or 1) > 1:
            raise ValueError("token recycling does not support beam search (num_beams > 1)")
    if getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError("token recycling supports decoder-only models")
    if input_ids.shape[0] != 1:
        raise NotImplementedError(f"token recycling supports batch size 1 (got {input_ids.shape[0]} sequences); "
                                  "call generate once per prompt")
    if cache is None:
        raise ValueError("token recycling needs a KV cache (use_cache=True)")
    from .patch import get_policy

    policy = get_policy(model)
    if policy is not None and policy.name != "dense" and not policy.verifies_trees:
        # A selection policy's decode step depends on the path before it (its selection cache) and
        # reads a per-query index set; a policy must verify trees itself to reproduce that.
        raise NotImplementedError(f"token recycling on a model patched with {policy.name!r} is not supported "
                                  "(the policy does not verify draft trees, so the output would not equal greedy "
                                  "decoding with it); unpatch the model or use plain generate")
    for layer in cache.layers:
        if not hasattr(layer, "crop") or type(layer).__name__.startswith("Static"):
            raise NotImplementedError(f"token recycling needs a dynamic cache; got {type(layer).__name__} layers "
                                      "(cache_implementation='static' is not supported)")


def _compact(cache, n: int, keep: torch.Tensor) -> None:
    """The last n stored tokens of every layer are a tree; keep the nodes `keep` (sorted) in order
    at the front of that region and drop the rest."""
    k = keep.numel()
    contiguous = bool((keep == torch.arange(k, device=keep.device)).all())
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", True) or layer.keys is None:
            continue
        if not contiguous:
            base = layer.keys.shape[-2] - n
            idx = keep.to(layer.keys.device) + base
            layer.keys[..., base:base + k, :] = layer.keys[..., idx, :]
            layer.values[..., base:base + k, :] = layer.values[..., idx, :]
        if n > k:
            layer.crop(-(n - k))
        elif getattr(layer, "is_sliding", False):
            layer.crop(0)  # a sliding layer that recorded the step: back to its window


def _processed_logits(logits: torch.Tensor, tree: TreeTemplate | None, tokens, sequence, processors) -> torch.Tensor:
    """Logits processors applied to every node with the sequence that node would continue
    (sequence + its ancestors' tokens), one processor call per tree level."""
    if not processors:
        return logits
    if tree is None:
        return processors(sequence, logits)
    out = torch.empty_like(logits)
    out[:1] = processors(sequence, logits[:1].clone())
    for level in tree.levels:
        level = level.to(logits.device)
        anc = tree.ancestors.to(logits.device)[level]  # [m, n+1]; BFS order = ancestors in depth order
        paths = torch.stack([tokens[row][1:] for row in anc])  # [m, depth]; excludes the root (in sequence)
        prefix = sequence.expand(level.numel(), -1)
        out[level] = processors(torch.cat((prefix, paths), dim=1), logits[level].clone())
    return out


@torch.no_grad()
def generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    tree="auto",
    adjacency: Adjacency | str | os.PathLike | None = None,
    seed_prompt: bool = True,
    **model_kwargs,
):
    """Greedy decoding with Token Recycling; pass as `model.generate(..., custom_generate=generate)`.

    tree: "auto" (sizes chosen by measured speed, see TreeChooser), "paper" (the 80-node tree),
        an int (the nested sub-tree of that many nodes; 0 = plain greedy steps), or a list of
        paths (slot indices from the root; every prefix of a path must be listed too).
    adjacency: an Adjacency (or a file written by `Adjacency.save`) to start from; default: the one
        kept on the model from earlier calls (hot start), or an empty one.
    seed_prompt: before decoding, make each prompt token's observed follower its first candidate
        (tokaccel's addition; the paper fills the matrix from logits only).
    Returns what greedy `generate` returns: the sequences [1, L] (or a GenerateDecoderOnlyOutput
    with sequences, scores / logits and the cache when return_dict_in_generate=True).
    """
    from transformers import LogitsProcessorList, StoppingCriteriaList
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    if synced_gpus:
        raise NotImplementedError("token recycling does not support synced_gpus")
    processors = logits_processor if logits_processor is not None else LogitsProcessorList()
    stopping = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()
    cache = call_cache(model_kwargs)
    _check(model, input_ids, generation_config, cache)
    device = input_ids.device
    if device.type == "cpu" and not packed_count(model) and packing_available() and \
            max((m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)), default=0) >= 2 ** 20:
        warnings.warn("token recycling on CPU: call tokaccel.pack_linears(model) once before generating; unpacked, "
                      "a verify forward of a few tokens costs 1.5-1.8x a one-token step and trees rarely pay "
                      "(packing keeps a second copy of the linear weights)", stacklevel=2)
    for layer in cache.layers:  # let sliding-window layers hold a verified tree until it is compacted
        if getattr(layer, "is_sliding", False) and hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()

    state = recycling_state(model)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None \
        else model.config.get_text_config().vocab_size
    if adjacency is not None:
        adjacency = adjacency if isinstance(adjacency, Adjacency) else Adjacency.load(adjacency, device)
        state = RecyclingState(adjacency) if state is None else state
        state.adjacency = adjacency
    if state is None:
        state = RecyclingState(Adjacency(vocab, device))
    if state.adjacency.table.device != device:
        state.adjacency.table = state.adjacency.table.to(device)
    if state.adjacency.vocab_size < vocab:
        raise ValueError(f"adjacency matrix has {state.adjacency.vocab_size} rows, the model's vocabulary {vocab}")
    model.__dict__[_STATE_ATTR] = state
    table, stats = state.adjacency.table, state.stats

    # tree choice
    trees = nested_trees()
    fixed = None
    if isinstance(tree, str):
        if tree == "paper":
            fixed = TreeTemplate(PAPER_TREE)
        elif tree != "auto":
            raise ValueError(f"tree={tree!r}: expected 'auto', 'paper', an int or a list of paths")
    elif isinstance(tree, bool) or not isinstance(tree, (int, list, tuple, TreeTemplate)):
        raise ValueError(f"tree={tree!r}: expected 'auto', 'paper', an int or a list of paths")
    elif isinstance(tree, int):
        if tree < 0 or tree > len(PAPER_TREE):
            raise ValueError(f"tree={tree}: expected a size in [0, {len(PAPER_TREE)}]")
        fixed = nested_trees(sizes=(tree,)).get(tree) if tree else 0
    else:
        fixed = tree if isinstance(tree, TreeTemplate) else TreeTemplate(tree)

    # a policy that verifies trees itself (TokenSelect) gets the tree with the verify forward
    patch = patch_state(model)

    def tree_kwargs(t: TreeTemplate) -> dict:
        return {TREE_KWARG: t} if patch is not None and patch.policy.verifies_trees else {}

    # prefill
    attention_mask = model_kwargs.get("attention_mask")
    position_ids = model_kwargs.get("position_ids")
    seen = cache.get_seq_length()
    if seen >= input_ids.shape[1]:
        raise ValueError("token recycling: the cache already holds the whole prompt")
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=device)[None]
    name = cache_kwarg(model)
    extra = {k: v for k, v in model_kwargs.items()
             if k not in ("cache", "past_key_values", "attention_mask", "position_ids", "use_cache", "logits_to_keep")}
    out = model(input_ids=input_ids[:, seen:], attention_mask=attention_mask, position_ids=position_ids[:, seen:],
                use_cache=True, logits_to_keep=1, **{name: cache}, **extra)
    raw = out.logits[0, -1:].float()
    scores_all = _processed_logits(raw, None, None, input_ids, processors)
    if seed_prompt:
        seed_from_sequence(table, input_ids[0])
    update_adjacency(table, input_ids[0, -1:], raw, torch.zeros(1, dtype=torch.long, device=device))

    want_scores = generation_config is not None and generation_config.return_dict_in_generate
    keep_scores = want_scores and generation_config.output_scores
    keep_logits = want_scores and generation_config.output_logits
    scores, raw_logits = [], []
    sequence = input_ids
    prefix_valid = (attention_mask[0].bool() if attention_mask is not None
                    else torch.ones(sequence.shape[1], dtype=torch.bool, device=device))
    next_pos = int(position_ids[0, -1]) + 1

    def emit(tokens: torch.Tensor, node_scores: torch.Tensor, node_raw: torch.Tensor) -> bool:
        """Append tokens [k] one by one, checking the stopping criteria after each; True = stop.
        Returns early on a stop, leaving `sequence` exactly as greedy generate would."""
        nonlocal sequence
        for j in range(tokens.numel()):
            sequence = torch.cat((sequence, tokens[j:j + 1][None]), dim=1)
            if keep_scores:
                scores.append(node_scores[j:j + 1])
            if keep_logits:
                raw_logits.append(node_raw[j:j + 1])
            if streamer is not None:
                streamer.put(tokens[j:j + 1].cpu())
            if bool(stopping(sequence, None).any()):
                return True
        return False

    first = scores_all.argmax(-1)
    done = emit(first, scores_all, raw)
    chooser = state.chooser
    tree_attention = _TreeAttention(model)  # finds the model's attention configs once, not every step
    if fixed is None and chooser is None and not done:
        seconds = calibrate(model, cache, cache.get_seq_length(), trees=trees, tree_kwargs=tree_kwargs)
        chooser = state.chooser = TreeChooser(AUTO_SIZES, seconds)
    if chooser is not None:
        chooser.new_sequence()

    while not done:
        size = chooser.pick() if fixed is None else (fixed if isinstance(fixed, int) else fixed.size)
        t = fixed if isinstance(fixed, TreeTemplate) else trees.get(size)
        root = sequence[0, -1]
        seen = cache.get_seq_length()
        prefix_valid = torch.cat((prefix_valid, prefix_valid.new_ones(seen - prefix_valid.numel())))
        start = time.perf_counter()
        if t is None:  # plain greedy step
            tokens = root.reshape(1)
            mask = None if attention_mask is None else torch.cat((prefix_valid, prefix_valid.new_ones(1)))[None].long()
            out = model(input_ids=tokens[None], position_ids=torch.tensor([[next_pos]], device=device),
                        attention_mask=mask, use_cache=True, logits_to_keep=1, **{name: cache}, **extra)
        else:
            tokens = draft_tree(table, root, t)
            positions = (next_pos + t.depth.to(device))[None]
            mask = _masks(model, t, cache, seen, prefix_valid, device)
            with tree_attention:
                out = model(input_ids=tokens[None], position_ids=positions, attention_mask=mask, use_cache=True,
                            logits_to_keep=0, **{name: cache}, **extra, **tree_kwargs(t))
        raw = out.logits[0].float()
        node_scores = _processed_logits(raw, t, tokens, sequence, processors)
        y = node_scores.argmax(-1)
        n = tokens.numel()
        if t is None:
            path = torch.zeros(1, dtype=torch.long, device=device)
            update_adjacency(table, tokens, raw, torch.zeros(1, dtype=torch.long, device=device))
        else:
            parent = t.parent.to(device)
            match = tokens == y[parent]
            match[0] = True
            ok = ~(t.ancestors.to(device) & ~match[None, :]).any(-1)  # every node on the way matches
            depth = t.depth.to(device)
            best = int(torch.where(ok, depth * n + (n - 1 - torch.arange(n, device=device)), -1).argmax())
            path = torch.nonzero(t.ancestors[best]).flatten().to(device)
            on_path = torch.zeros(n, dtype=torch.bool, device=device)
            on_path[path] = True
            update_adjacency(table, tokens, raw, _update_priority(t, on_path))
            if fixed is None:
                ranks, depths = t.rank.to(device), depth
                accepted = {m: int(torch.where(ok & (ranks < m), depths, 0).max()) for m in chooser.sizes
                            if 0 < m <= size}
        _compact(cache, n, path)
        if t is not None and patch is not None and patch.policy.verifies_trees:
            patch.policy.commit_tree(patch.contexts, cache, path.tolist())
        out_tokens = torch.cat((tokens[path[1:]], y[path[-1:]]))
        stats.steps += 1
        stats.sizes[size] = stats.sizes.get(size, 0) + 1
        stats.drafted += n - 1
        stats.accepted += path.numel() - 1
        stats.emitted += out_tokens.numel()
        stats.tree_steps += t is not None
        next_pos += path.numel()
        done = emit(out_tokens, node_scores[path], raw[path])
        if fixed is None:
            chooser.observe(size, accepted if t is not None else {}, time.perf_counter() - start)

    # The cache holds every token but the last, as after greedy generate.
    extra_tokens = cache.get_seq_length() - (sequence.shape[1] - 1)
    if extra_tokens > 0:
        cache.crop(-extra_tokens)
    if streamer is not None:
        streamer.end()
    if want_scores:
        return GenerateDecoderOnlyOutput(sequences=sequence, scores=tuple(scores) if keep_scores else None,
                                         logits=tuple(raw_logits) if keep_logits else None,
                                         **{"cache" if name == "cache" else "past_key_values": cache})
    return sequence
