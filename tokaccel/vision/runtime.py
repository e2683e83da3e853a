"""The hooks that remove image tokens from a VLM's sequence, for `forward` and `generate`.

Three kinds of forward pre-hooks, installed by a visual-pruning policy's `on_patch`:

* on the multimodal model (`XModel.forward`): at prefill (empty or no cache) it records which
  rows are image placeholders (`input_ids == config.image_token_id`, or the embedding test HF's
  own `get_placeholder_mask` uses without ids); at a decode step of a pruned sequence it maps the
  caller's 2-D attention mask (original columns) onto the pruned cache and, when the caller gave
  no positions, supplies the original ones (kept tokens keep their positions; new ones continue
  after the original prompt).
* on the text decoder: stage 0 ("before the LLM"): gathers `inputs_embeds`, the 2-D mask and the
  position ids (1-D, or all rows of Qwen2-VL's 3-D / 4-row M-RoPE ids) with one keep index.
  The model then builds its own causal mask and rotary tables from them.
* on decoder layers >= K for stages inside the LLM (FastV, ToDRE's second stage): the model built
  its mask / rotary tables for the stage-0 sequence; each later layer receives them gathered to
  the rows it keeps (and, when decoding, its mask's cache columns gathered the same way).

Rows whose counts differ after pruning are left-padded (mask 0), like a left-padded batch.
One `SeqState` per cache object (a WeakKeyDictionary): a second `generate` with a fresh cache
starts clean.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch

from ..cache import cache_kwarg, call_cache
from .families import VisionFamily

logger = logging.getLogger(__name__)


@dataclass
class StageInput:
    """What a policy's `select` sees at one pruning stage (current sequence of length L)."""

    hidden: torch.Tensor  # [B, L, H] rows entering the stage (projected image features at stage 0)
    image: torch.Tensor  # [B, L] bool: image placeholder rows still present
    span: torch.Tensor  # [B, L] long: image index (batch-major, in prompt order), -1 elsewhere
    span_len: torch.Tensor  # [n_images] long: rows of each image still present
    orig_span_len: torch.Tensor  # [n_images] long: rows of each image before any pruning
    valid: torch.Tensor  # [B, L] bool: not padding
    last: torch.Tensor  # [B] long: index of each row's last real token (the query FastV reads)
    signals: dict  # "attn": [B, L] last-row attention (inside the LLM); "vision": encoder captures; "family"

    @property
    def n_images(self) -> int:
        return int(self.span_len.numel())

    @property
    def text(self) -> torch.Tensor:
        """[B, L] bool: real text tokens."""
        return self.valid & ~self.image


@dataclass
class Group:
    """The sequence seen by the decoder layers from `start` on (until the next stage)."""

    start: int  # first decoder layer of the group
    cols: torch.Tensor  # [B, Lg] long: columns in group-0 coordinates (group 0: original columns)
    valid: torch.Tensor  # [B, Lg] bool
    image: torch.Tensor  # [B, Lg] bool
    span: torch.Tensor  # [B, Lg] long
    prev_idx: torch.Tensor | None = None  # [B, Lg] rows of the previous group (None: identity)

    @property
    def length(self) -> int:
        return self.cols.shape[1]


@dataclass
class SeqState:
    orig_len: int  # prompt length before pruning
    orig_span_len: torch.Tensor
    groups: list
    phase: str = "prefill"
    span_start: torch.Tensor | None = None  # [n_images] first original column of each image
    signals: dict = field(default_factory=dict)  # stage index -> [B, L] captured attention
    memo: dict = field(default_factory=dict)  # per-forward cache of gathered masks / rotary tables


def image_spans(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximal runs of image rows, numbered batch-major. image [B, L] bool -> (span [B, L] long,
    -1 outside images; lengths [n])."""
    prev = torch.zeros_like(image)
    prev[:, 1:] = image[:, :-1]
    starts = image & ~prev
    ids = starts.flatten().cumsum(0).view_as(image) - 1
    span = torch.where(image, ids, torch.full_like(ids, -1))
    n = int(starts.sum())
    lengths = torch.bincount(span[image], minlength=n) if n else span.new_zeros(0)
    return span, lengths


def keep_count(keep: int | float, n: torch.Tensor) -> torch.Tensor:
    """Tokens to keep per image: an int (capped at the image's size) or a ratio (ceil, >= 1)."""
    if isinstance(keep, float):
        return torch.clamp(torch.ceil(n.double() * keep - 1e-9).long(), min=1).minimum(n).where(n > 0, n)
    return n.clamp(max=int(keep))


def top_per_span(scores: torch.Tensor, span: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the k[s] highest-scoring rows of each span (ties: lower index). scores, span [B, L];
    k [n] -> [B, L] bool (False outside spans)."""
    flat_s, flat_sp = scores.flatten().float(), span.flatten()
    rows = torch.nonzero(flat_sp >= 0).flatten()
    if rows.numel() == 0:
        return torch.zeros_like(span, dtype=torch.bool)
    order = torch.argsort(-flat_s[rows], stable=True)
    order = order[torch.argsort(flat_sp[rows][order], stable=True)]  # by span, best first within
    sorted_rows = rows[order]
    sp = flat_sp[sorted_rows]
    counts = torch.bincount(sp, minlength=k.numel())
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(sorted_rows.numel(), device=scores.device) - starts[sp]
    keep = torch.zeros(span.numel(), dtype=torch.bool, device=span.device)
    keep[sorted_rows[rank < k[sp]]] = True
    return keep.view_as(span)


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of kept entries, each row left-padded to the longest.
    keep [B, L] bool -> (idx [B, L'] long (0 in pad slots), filled [B, L'] bool)."""
    B, L = keep.shape
    counts = keep.sum(1)
    new_len = int(counts.max()) if B else 0
    rank = keep.long().cumsum(1) - 1
    target = (new_len - counts)[:, None] + rank
    idx = torch.zeros(B, new_len, dtype=torch.long, device=keep.device)
    filled = torch.zeros(B, new_len, dtype=torch.bool, device=keep.device)
    b, pos = torch.nonzero(keep, as_tuple=True)
    idx[b, target[b, pos]] = pos
    filled[b, target[b, pos]] = True
    return idx, filled


def _gather_last(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather the sequence dim (last) of ids shaped [B, L], [1, L] or [R, B, L] with idx [B, L']."""
    if t.dim() == 2:
        return t.expand(idx.shape[0], -1).gather(1, idx)
    R = t.shape[0]
    return t.expand(R, idx.shape[0], -1).gather(2, idx[None].expand(R, -1, -1))


def _gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather dim 1 of [B or 1, L, ...] with idx [B, L']."""
    t = t.expand(idx.shape[0], *t.shape[1:])
    return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))


def _check_bool_mask(mask) -> None:
    if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4):
        raise NotImplementedError(
            "visual-token pruning inside the LLM needs the boolean 4-D masks of tokaccel's mask entry; "
            f"got {type(mask).__name__} {getattr(mask, 'dtype', '')}"
        )


class Pruner:
    """Installs the hooks for one patched VLM and runs the policy's stages (see module docstring)."""

    def __init__(self, policy, family: VisionFamily, stats):
        self.policy = policy
        self.family = family
        self.stats = stats
        layers = policy.stage_layers(len(family.layers))
        self.stage0 = bool(layers) and layers[0] == 0
        self.inner = [k for k in layers if k > 0]  # decoder layers where an inner stage prunes
        self.seqs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.current: SeqState | None = None
        self.pending: tuple | None = None  # (image [B, L], attention_mask) recorded by the outer hook
        self.vision: dict = {}  # encoder captures of the latest image encoding
        self.last_selection: list | None = None  # per image: kept original offsets (within the image)
        self._cache_kw = cache_kwarg(family.text_model)

    # ------------------------------------------------------------------ installation
    def install(self) -> list:
        f = self.family
        handles = [f.outer.register_forward_pre_hook(self._outer_hook, with_kwargs=True),
                   f.text_model.register_forward_pre_hook(self._text_hook, with_kwargs=True)]
        if self.inner:
            for i in range(self.inner[0], len(f.layers)):
                handles.append(f.layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        return handles

    def _group_of(self, layer: int) -> int:
        return sum(1 for k in self.inner if k <= layer)

    # ------------------------------------------------------------------ outer model
    def _outer_hook(self, module, args, kwargs):
        cache = call_cache(kwargs)
        seen = cache.get_seq_length() if cache is not None else 0
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if seen == 0:
            if ids is not None:
                image = ids == self.family.image_token_id
            else:
                embeds = kwargs["inputs_embeds"]
                token = torch.full((), self.family.image_token_id, dtype=torch.long, device=embeds.device)
                image = (embeds == module.get_input_embeddings()(token)).all(-1)
            self.pending = (image, kwargs.get("attention_mask")) if bool(image.any()) else None
            return None
        seq = self.seqs.get(cache)
        if seq is None:
            return None
        g0 = seq.groups[0]
        mask = kwargs.get("attention_mask")
        q = (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
        generated = seen - g0.length
        if kwargs.get("position_ids") is None:
            total = torch.full((g0.cols.shape[0],), seq.orig_len + generated, device=g0.cols.device)
            kwargs["position_ids"] = self.family.decode_positions(total, q)
        if mask is not None:
            if mask.dim() != 2 or mask.shape[1] != seq.orig_len + generated + q:
                raise ValueError(
                    f"decoding a pruned sequence needs the 2-D attention mask over the original columns "
                    f"({seq.orig_len} prompt + {generated} generated + {q} new), got {tuple(mask.shape)}"
                )
            head = mask[:, : seq.orig_len].gather(1, g0.cols) * g0.valid.to(mask.dtype)
            kwargs["attention_mask"] = torch.cat([head, mask[:, seq.orig_len:]], dim=1)
        elif not bool(g0.valid.all()):
            ones = torch.ones(g0.valid.shape[0], generated + q, dtype=torch.long, device=g0.valid.device)
            kwargs["attention_mask"] = torch.cat([g0.valid.long(), ones], dim=1)
        return args, kwargs

    # ------------------------------------------------------------------ text decoder (stage 0)
    def _text_hook(self, module, args, kwargs):
        cache = call_cache(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            self.current = self.seqs.get(cache)
            if self.current is not None:
                self.current.phase = "decode"
                self.current.memo.clear()
            return None
        pending, self.pending = self.pending, None
        self.current = None
        embeds = kwargs.get("inputs_embeds")
        if pending is None or embeds is None:
            return None
        image, mask2d = pending
        B, L = embeds.shape[:2]
        self._check_window(L)
        if image.shape != (B, L):
            raise ValueError(f"image placeholder mask {tuple(image.shape)} does not match the decoder input {(B, L)}")
        image = image.to(embeds.device)
        valid = (mask2d.to(embeds.device).bool() if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2
                 else torch.ones(B, L, dtype=torch.bool, device=embeds.device))
        image = image & valid
        span, span_len = image_spans(image)
        seq = SeqState(L, span_len.clone(), [])
        cols_all = torch.arange(L, device=embeds.device)[None].expand(B, L)
        seq.span_start = torch.full_like(span_len, L).scatter_reduce(0, span[image], cols_all[image], "amin")
        cols = torch.arange(L, device=embeds.device)[None].expand(B, L)
        group = Group(0, cols, valid, image, span)
        self.stats["vision_images"] += int(span_len.numel())
        self.stats["vision_image_tokens"] += int(span_len.sum())
        if self.stage0:
            vision, self.vision = self.vision, {}
            inp = self._stage_input(embeds, group, seq, {"vision": vision, "family": self.family})
            keep = self._keep(0, inp, group)
            idx, filled = compact(keep)
            group = Group(0, idx, valid.gather(1, idx) & filled, image.gather(1, idx) & filled,
                          torch.where(filled, span.gather(1, idx), -1))
            kwargs["inputs_embeds"] = _gather_rows(embeds, idx)
            am = kwargs.get("attention_mask")
            if am is not None and not (isinstance(am, torch.Tensor) and am.dim() == 2):
                raise NotImplementedError(
                    f"{self.family.name}: the decoder received a prebuilt {type(am).__name__} attention mask; "
                    "pruning before the LLM needs the 2-D padding mask (tested: LLaVA, LLaVA-NeXT, Qwen2-VL, "
                    "Qwen2.5-VL, Idefics3)"
                )
            kwargs["attention_mask"] = group.valid.long()
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = torch.arange(L, device=embeds.device)[None]
            kwargs["position_ids"] = _gather_last(pos, idx)
        seq.groups.append(group)
        if cache is None and kwargs.get("use_cache", getattr(module.config, "use_cache", False)):
            from transformers import DynamicCache

            cache = DynamicCache(config=module.config)
            kwargs[self._cache_kw] = cache
        if cache is not None:
            self.seqs[cache] = seq
        self.current = seq
        if not self.inner:
            self._finish(seq)
        return args, kwargs

    def _check_window(self, total: int) -> None:
        """Sliding-window layers (Gemma3) keep only the last `window` keys in their cache; pruning
        inside the LLM maps mask columns by position, which holds only while nothing slid out."""
        w = self.family.window
        if w is not None and self.inner and total > w:
            raise NotImplementedError(
                f"{self.policy.name}: pruning inside the LLM of a model with sliding-window layers works while "
                f"prompt + generated tokens fit the window ({w}); this call needs {total}"
            )

    # ------------------------------------------------------------------ stages
    def _stage_input(self, hidden, group: Group, seq: SeqState, signals: dict) -> StageInput:
        span_len = torch.bincount(group.span[group.image], minlength=seq.orig_span_len.numel())
        pos = torch.arange(group.length, device=hidden.device)[None]
        last = torch.where(group.valid, pos, -1).amax(1).clamp(min=0)
        return StageInput(hidden, group.image, group.span, span_len, seq.orig_span_len, group.valid, last, signals)

    def _keep(self, stage: int, inp: StageInput, group: Group) -> torch.Tensor:
        keep_img = self.policy.select(stage, inp)
        if keep_img.shape != group.image.shape or keep_img.dtype != torch.bool:
            raise RuntimeError(f"{self.policy.name}.select returned {keep_img.dtype} {tuple(keep_img.shape)}")
        return ~group.image | (keep_img & group.image)

    def _finish(self, seq: SeqState) -> None:
        """Stats and `last_selection` once the last stage ran."""
        last = seq.groups[-1]
        orig_cols = last.cols if len(seq.groups) == 1 else seq.groups[0].cols.gather(1, last.cols)
        kept = last.image
        self.stats["vision_image_tokens_kept"] += int(kept.sum())
        b, p = torch.nonzero(kept, as_tuple=True)
        spans = last.span[b, p]
        offsets = orig_cols[b, p] - seq.span_start[spans]
        self.last_selection = [offsets[spans == s].sort().values.tolist() for s in range(seq.orig_span_len.numel())]

    # ------------------------------------------------------------------ inner stages (decoder layers)
    def _layer_hook(self, layer: int):
        def hook(module, args, kwargs):
            seq = self.current
            if seq is None:
                return None
            g = self._group_of(layer)
            if g == 0:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if seq.phase == "prefill":
                if len(seq.groups) == g:  # this layer starts group g: run stage g
                    prev = seq.groups[g - 1]
                    inp = self._stage_input(hidden, prev, seq, {"attn": seq.signals.get(g), "family": self.family})
                    keep = self._keep(g, inp, prev)
                    idx, filled = compact(keep)
                    cols = prev.cols.gather(1, idx) if g > 1 else idx
                    seq.groups.append(Group(layer, cols, prev.valid.gather(1, idx) & filled,
                                            prev.image.gather(1, idx) & filled,
                                            torch.where(filled, prev.span.gather(1, idx), -1), idx))
                    if g == len(self.inner):
                        self._finish(seq)
                group = seq.groups[g]
                if hidden.shape[1] == seq.groups[g - 1].length and group.prev_idx is not None \
                        and layer == group.start:
                    hidden = _gather_rows(hidden, group.prev_idx)
                kwargs = self._prefill_kwargs(seq, g, kwargs)
            else:
                cache = call_cache(kwargs)
                self._check_window((cache.get_seq_length() if cache is not None else 0) + hidden.shape[1])
                kwargs = self._decode_kwargs(seq, g, kwargs)
            if args:
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _prefill_kwargs(self, seq: SeqState, g: int, kwargs: dict) -> dict:
        group = seq.groups[g]
        cols, valid = group.cols, group.valid
        mask = kwargs.get("attention_mask")
        key = ("mask", g, id(mask))
        if key not in seq.memo:
            if mask is None:
                new = None if bool(valid.all()) else self._causal_mask(cols, cols, valid)
            else:
                _check_bool_mask(mask)
                B, L = cols.shape
                m = mask.expand(B, mask.shape[1], -1, -1)
                m = m.gather(2, cols[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[3]))
                m = m.gather(3, cols[:, None, None, :].expand(-1, m.shape[1], L, -1))
                new = self._fix_pad_rows(m & valid[:, None, None, :], valid)
            seq.memo[key] = (mask, new)  # keep `mask` alive so its id stays unique this forward
        kwargs["attention_mask"] = seq.memo[key][1]
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            key = ("pe", g, id(pe))
            if key not in seq.memo:
                seq.memo[key] = (pe, tuple(_gather_rows(t, cols) for t in pe))
            kwargs["position_embeddings"] = seq.memo[key][1]
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = _gather_last(kwargs["position_ids"], cols)
        return kwargs

    def _decode_kwargs(self, seq: SeqState, g: int, kwargs: dict) -> dict:
        group = seq.groups[g]
        mask = kwargs.get("attention_mask")
        key = ("mask", g, id(mask))
        if key not in seq.memo:
            L0 = seq.groups[0].length
            if mask is None:
                if bool(group.valid.all()):
                    new = None
                else:
                    hidden = kwargs.get("hidden_states")
                    q = kwargs["position_embeddings"][0].shape[-2] if hidden is None else hidden.shape[1]
                    cache = call_cache(kwargs)
                    kv_old = cache.get_seq_length() - L0 if cache is not None else 0  # generated so far
                    extra = torch.arange(L0, L0 + kv_old + q, device=group.cols.device)
                    kcols = torch.cat([group.cols, extra[None].expand(group.cols.shape[0], -1)], 1)
                    kvalid = torch.cat([group.valid, torch.ones_like(extra[None].expand(group.cols.shape[0], -1),
                                                                     dtype=torch.bool)], 1)
                    qcols = extra[-q:][None].expand(group.cols.shape[0], -1)
                    new = self._causal_mask(qcols, kcols, kvalid)
            else:
                _check_bool_mask(mask)
                B = group.cols.shape[0]
                kv = mask.shape[-1]
                extra = torch.arange(L0, kv, device=mask.device)[None].expand(B, -1)
                kcols = torch.cat([group.cols, extra], 1)
                kvalid = torch.cat([group.valid, torch.ones_like(extra, dtype=torch.bool)], 1)
                m = mask.expand(B, *mask.shape[1:])
                new = m.gather(3, kcols[:, None, None, :].expand(-1, m.shape[1], m.shape[2], -1)) \
                    & kvalid[:, None, None, :]
            seq.memo[key] = (mask, new)
        kwargs["attention_mask"] = seq.memo[key][1]
        return kwargs

    @staticmethod
    def _causal_mask(qcols: torch.Tensor, kcols: torch.Tensor, kvalid: torch.Tensor) -> torch.Tensor:
        """[B, 1, q, k] bool: key column <= query column (group-0 coordinates) and key not padding."""
        allowed = (kcols[:, None, :] <= qcols[:, :, None]) & kvalid[:, None, :]
        return allowed[:, None]

    @staticmethod
    def _fix_pad_rows(mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Padding query rows attend to themselves, so no row is fully masked (no NaN from SDPA)."""
        if bool(valid.all()):
            return mask
        L = valid.shape[1]
        eye = torch.eye(L, dtype=torch.bool, device=mask.device)[None, None]
        return mask | (eye & ~valid[:, None, :, None])
