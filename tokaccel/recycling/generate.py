"""The decoding loop, `generate(custom_generate=tokaccel.recycling.generate)`."""

from __future__ import annotations

import os
import time
import warnings

import torch

from ..cache import cache_kwarg, call_cache
from ..cpu_linear import available as packing_available
from ..cpu_linear import packed_count
from ..patch import patch_state
from ..policies.base import TREE_KWARG
from ..validation import check_int, invalid, is_int
from .adjacency import Adjacency, draft_tree, seed_from_sequence, update_adjacency, update_priority
from .calibration import calibrate
from .masks import TreeAttention, tree_masks
from .state import RecyclingState, TreeChooser, recycling_state, set_recycling_state
from .trees import AUTO_SIZES, PAPER_TREE, TreeTemplate, nested_trees
from .verify import TreeVerification, commit_tree

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
    from ..patch import get_policy

    policy = get_policy(model)
    if policy is not None and not (policy.attends_through_mask or policy.verifies_trees):
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
    set_recycling_state(model, state)
    table, stats = state.adjacency.table, state.stats

    # tree choice
    trees = nested_trees()
    fixed = None
    tree_kinds = f"expected 'auto', 'paper', a size (an integer in [0, {len(PAPER_TREE)}]) or a list of paths"
    if isinstance(tree, str):
        if tree not in ("auto", "paper"):
            raise invalid("token recycling", "tree", tree, tree_kinds)
        if tree == "paper":
            fixed = TreeTemplate(PAPER_TREE)
    elif is_int(tree):
        check_int("token recycling", "tree", tree, 0, len(PAPER_TREE))
        fixed = nested_trees(sizes=(int(tree),)).get(int(tree)) if tree else 0
    elif isinstance(tree, (list, tuple, TreeTemplate)):
        fixed = tree if isinstance(tree, TreeTemplate) else TreeTemplate(tree)
    else:
        raise invalid("token recycling", "tree", tree, tree_kinds)

    # a policy that verifies trees itself (TokenSelect) gets the tree with the verify forward
    patch = patch_state(model)

    def tree_kwargs(t: TreeTemplate) -> dict:
        return {TREE_KWARG: TreeVerification(t)} if patch is not None and patch.policy.verifies_trees else {}

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
    tree_attention = TreeAttention(model)  # finds the model's attention configs once, not every step
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
            mask = tree_masks(model, t, cache, seen, prefix_valid, device)
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
            update_adjacency(table, tokens, raw, update_priority(t, on_path))
            if fixed is None:
                ranks, depths = t.rank.to(device), depth
                accepted = {m: int(torch.where(ok & (ranks < m), depths, 0).max()) for m in chooser.sizes
                            if 0 < m <= size}
        _compact(cache, n, path)
        if t is not None and patch is not None and patch.policy.verifies_trees:
            commit_tree(patch.contexts, cache, path.tolist())
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
