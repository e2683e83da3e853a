"""Offline calibration for FASA (docs/methods.md §1.3): the dominant RoPE frequency chunks (FCs) of
every layer and KV head, saved once per model as a small JSON file.

RoPE splits q.k into D/2 independent 2-D chunks: in HF's `rotate_half` layout FC i is the dim
pair (i, i + D/2) ("hf", the default); the official FASA release pairs (2i, 2i+1)
("interleaved", the layout of models that rotate adjacent dims). For real queries and keys
captured on long natural text (the eval harness's essay haystack), the score of FC f is its
partial dot product q_f . k_f; its agreement with the full score is the overlap of the top-K keys
by each, |topK(partial) ∩ topK(full)| / K, averaged over query positions and over the G query
heads of a KV head. The dominant FCs of a head (`fraction` of them) are chosen either by that
single-FC overlap ("single", the paper's ranking, the default) or greedily for their *sum*, the
score the policy uses ("combined"): start empty and add the FC whose addition gives the sum of
the chosen FCs' partial scores the highest top-K overlap with the full score. "combined" raises
that summed overlap (SmolLM2: 0.62 -> 0.71) but did not raise accuracy where measured (docs/selection.md, FASA).

Queries and keys are captured through tokaccel's own attention entry (a Dense policy that also
records them: post-RoPE, as attention sees them), never with a copied forward. Single-FC overlaps
are computed layer by layer inside the forward, so nothing of size N x N is kept; "combined" keeps
each layer's keys and measured queries ([Hk, N, D] + [H, Q, D] per sample) for the greedy pass.

File: $TOKACCEL_CACHE/fasa/<model key>.<pairing>.json (default ~/.cache/tokaccel); `tokaccel
calibrate --model NAME --policy fasa` writes it, `FASA` reads it.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from .policies.dense import Dense, dense_with_stats
from .policies.fasa_calibration import (  # noqa: F401  (re-exported: the calibration API in one place)
    FORMAT,
    PAIRINGS,
    SELECTIONS,
    calibrate_command,
    calibration_path,
    fc_dims,
    fc_pairs,
    load_calibration,
    model_key_of,
    save_calibration,
)
from .validation import check_choice, check_int, check_number, invalid

logger = logging.getLogger(__name__)

QUERY_CHUNK = 8  # query positions scored at once: bounds the [Hk, G, F, q, N] temporary


# ------------------------------------------------------------------------------------ chunk maths
def fc_overlap(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, top_k: int, pairing: str
               ) -> torch.Tensor:
    """Top-K agreement of each FC's partial score with the full score.

    query [H, N, D], key [Hk, N, D] (one sequence, as attention sees them); positions [Q] long:
    the query positions measured (each sees keys 0..p, at least top_k of them). Returns [Hk, D/2]
    fp32: |topK(q_f . k_f) ∩ topK(q . k)| / K, mean over the Q positions and the G query heads
    of each KV head (query head h reads KV head h // G)."""
    H, N, D = query.shape
    Hk, F = key.shape[0], D // 2
    G = H // Hk
    kp = fc_pairs(key.float(), pairing)  # [Hk, N, F, 2]
    total = torch.zeros(Hk, F)
    for chunk in positions.split(QUERY_CHUNK):
        Q = chunk.numel()
        qp = fc_pairs(query[:, chunk].float(), pairing).reshape(Hk, G, Q, F, 2)
        partial = torch.einsum("hgqfc,hnfc->hgfqn", qp, kp)  # [Hk, G, F, Q, N]
        full = partial.sum(2)  # [Hk, G, Q, N]: the full logit, FC by FC
        future = torch.arange(N, device=key.device)[None] > chunk[:, None].to(key.device)  # [Q, N]
        partial.masked_fill_(future, float("-inf"))
        full.masked_fill_(future, float("-inf"))
        in_full = torch.zeros_like(full, dtype=torch.bool).scatter_(-1, full.topk(top_k, dim=-1).indices, True)
        picked = partial.topk(top_k, dim=-1).indices  # [Hk, G, F, Q, K]
        hits = in_full[:, :, None].expand(-1, -1, F, -1, -1).gather(-1, picked)
        total += hits.float().mean(-1).sum(3).mean(1).cpu()  # sum over Q, mean over G
    return total / positions.numel()


def dominant_fcs(overlap: torch.Tensor, n_fc: int) -> list[list[int]]:
    """overlap [Hk, F] -> per KV head the n_fc FCs of highest overlap, ascending ids."""
    return [sorted(row.topk(n_fc).indices.tolist()) for row in overlap]


def combined_fcs(captures: list[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor, n_fc: int, top_k: int,
                 pairing: str) -> tuple[list[list[int]], list[float]]:
    """Greedy choice of n_fc FCs per KV head for the top-K overlap of their summed partial score.

    captures: per sample (query [H, Q, D] at `positions`, key [Hk, N, D]) of one layer. Returns
    per KV head the FCs in the order chosen, and the overlap of the final sum (mean over samples,
    positions and the G query heads)."""
    Hk = captures[0][1].shape[0]
    prepared = []
    for query, key in captures:
        H, Q, D = query.shape
        qp = fc_pairs(query.float(), pairing).reshape(Hk, H // Hk, Q, D // 2, 2)
        kp = fc_pairs(key.float(), pairing)  # [Hk, N, F, 2]
        future = torch.arange(key.shape[1])[None] > positions[:, None]  # [Q, N]
        prepared.append((qp, kp, future))
    chosen, final = [], []
    for h in range(Hk):
        terms, in_full = [], []
        for qp, kp, future in prepared:
            t = torch.einsum("gqfc,nfc->fgqn", qp[h], kp[h])  # [F, G, Q, N]
            full = t.sum(0).masked_fill(future, float("-inf"))
            in_full.append(torch.zeros_like(full, dtype=torch.bool).scatter_(-1, full.topk(top_k, dim=-1).indices, True))
            terms.append(t.masked_fill_(future, float("-inf")))
        picked: list[int] = []
        sums = [torch.zeros_like(t[0]) for t in terms]
        for _ in range(n_fc):
            score = torch.zeros(terms[0].shape[0])
            for s, t, f in zip(sums, terms, in_full):
                idx = (s[None] + t).topk(top_k, dim=-1).indices  # [F, G, Q, K]
                score += f[None].expand(t.shape[0], -1, -1, -1).gather(-1, idx).float().mean((1, 2, 3))
            score[picked] = -1
            best = int(score.argmax())
            picked.append(best)
            sums = [s + t[best] for s, t in zip(sums, terms)]
        chosen.append(picked)
        final.append(float(score[best]) / len(terms))
    return chosen, final


# ------------------------------------------------------------------------------------ capture
@dataclass
class _RecordingDense(Dense):
    """Dense attention that also measures FC overlaps of each call's queries and keys (not
    registered: used only by `calibrate_fasa`)."""

    name: ClassVar[str] = "fasa-calibration"
    backend: str = "sdpa"
    positions: torch.Tensor | None = None
    top_k: int = 128
    pairing: str = "hf"
    overlaps: dict | None = None  # layer index -> summed [Hk, F] overlap
    captures: dict | None = None  # layer index -> [(query [H, Q, D], key [Hk, N, D])] per sample; None: not kept

    def attend(self, ctx, module, query, key, value, attention_mask, **kwargs):
        per_row = [fc_overlap(query[b], key[b], self.positions, self.top_k, self.pairing) for b in range(query.shape[0])]
        layer = ctx.info.layer_idx
        self.overlaps[layer] = self.overlaps.get(layer, 0) + sum(per_row)
        if self.captures is not None:
            self.captures.setdefault(layer, []).extend(
                (query[b][:, self.positions.to(query.device)].cpu(), key[b].cpu()) for b in range(query.shape[0]))
        return dense_with_stats(ctx, module, query, key, value, attention_mask, **kwargs)


def query_positions(length: int, top_k: int, queries: int) -> torch.Tensor:
    """`queries` positions spread evenly over the second half of a `length`-token sample."""
    if top_k > length // 2:
        raise invalid("fasa calibration", "top_k", top_k, f"it needs samples of at least {2 * top_k} tokens, "
                                                          f"got {length}")
    return torch.linspace(length // 2, length - 1, min(queries, length - length // 2)).round().long()


@torch.no_grad()
def calibrate_fasa(model, samples: list[torch.Tensor], top_k: int = 128, fraction: float = 0.25,
                   pairing: str = "hf", queries: int = 32, model_key: str | None = None,
                   selection: str = "single") -> dict:
    """The calibration dict of `model`: samples are input_ids [1, L] (same L); for every layer
    and KV head, the overlap of each FC (D/2 of them) and the dominant `fraction` of the FCs,
    chosen by `selection` ("single": by their own overlap; "combined": greedy for their sum)."""
    from .patch import patch_state, patched

    owner = "fasa calibration"
    check_choice(owner, "pairing", pairing, PAIRINGS)
    check_choice(owner, "selection", selection, SELECTIONS)
    check_int(owner, "top_k", top_k, 1)
    check_number(owner, "fraction", fraction, 0, 1, low_open=True)
    if not samples or len({s.shape[-1] for s in samples}) != 1:
        raise ValueError("fasa calibration: give at least one sample, all of the same length")
    length = samples[0].shape[-1]
    device = next(model.parameters()).device
    recorder = _RecordingDense(positions=query_positions(length, top_k, queries), top_k=top_k, pairing=pairing,
                               overlaps={}, captures={} if selection == "combined" else None)
    started = time.perf_counter()
    with patched(model, recorder):
        infos = [ctx.info for ctx in patch_state(model).contexts]
        for ids in samples:
            model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)
    infos = sorted(infos, key=lambda info: info.layer_idx)
    head_dims = {info.head_dim for info in infos}
    kv_heads = {info.num_kv_heads for info in infos}
    if len(head_dims) != 1 or len(kv_heads) != 1:
        raise NotImplementedError(f"fasa calibration: layers differ in head dim {head_dims} or KV heads {kv_heads}")
    D, Hk = head_dims.pop(), kv_heads.pop()
    n_fc = max(1, round(fraction * D / 2))
    overlap = [recorder.overlaps[info.layer_idx] / len(samples) for info in infos]  # [Hk, F] each
    extra = {}
    if selection == "combined":
        greedy = [combined_fcs(recorder.captures.pop(info.layer_idx), recorder.positions, n_fc, top_k, pairing)
                  for info in infos]
        chosen = [fcs for fcs, _ in greedy]
        extra["combined_overlap_mean"] = round(sum(sum(o) for _, o in greedy) / (len(greedy) * Hk), 4)
    else:
        chosen = [dominant_fcs(o, n_fc) for o in overlap]
    chosen_mean = float(torch.stack([o.gather(1, torch.tensor(c)) for o, c in zip(overlap, chosen)]).mean())
    return {
        "format": FORMAT, "model": model_key or model_key_of(model), "pairing": pairing, "selection": selection,
        "num_layers": len(infos), "num_kv_heads": Hk, "head_dim": D, "n_fc": n_fc, "top_k": top_k,
        "samples": len(samples), "length": length, "queries_per_sample": int(recorder.positions.numel()),
        "seconds": round(time.perf_counter() - started, 2), "chosen_overlap_mean": round(chosen_mean, 4), **extra,
        "dominant_fcs": chosen, "overlap": [[[round(v, 4) for v in row] for row in o.tolist()] for o in overlap],
    }


# ------------------------------------------------------------------------------------ files
# ------------------------------------------------------------------------------------ CLI
def haystack_samples(tokenizer, n: int, length: int) -> list[torch.Tensor]:
    """n samples of `length` token ids of the essay haystack (BOS first when the tokenizer has
    one), each starting at a different sentence."""
    from .evals.haystack import haystack_units, take_units

    units = haystack_units(tokenizer, "essay")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for i in range(n):
        flat = [t for unit in take_units(units, i * len(units) // max(n, 1), length) for t in unit]
        out.append(torch.tensor((bos + flat)[:length])[None])
    return out


def _run(args) -> int:
    from . import models

    if args.policy != "fasa":
        raise SystemExit(f"calibrate: --policy {args.policy!r} is not valid; only 'fasa' needs calibration")
    model, tokenizer = models.load(args.model)
    key = models.resolve_name(args.model)
    samples = haystack_samples(tokenizer, args.samples, args.length)
    calibration = calibrate_fasa(model, samples, top_k=args.top_k, fraction=args.fraction, pairing=args.pairing,
                                 queries=args.queries, model_key=key, selection=args.selection)
    path = save_calibration(calibration, args.out)
    print(f"{path}: {calibration['num_layers']} layers x {calibration['num_kv_heads']} KV heads, "
          f"{calibration['n_fc']} of {calibration['head_dim'] // 2} FCs, mean top-{args.top_k} overlap of the "
          f"chosen FCs {calibration['chosen_overlap_mean']:.3f} each"
          + (f", {calibration['combined_overlap_mean']:.3f} summed" if "combined_overlap_mean" in calibration else "")
          + f", {calibration['seconds']:.1f} s")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="offline calibration of a policy (FASA's dominant frequency chunks)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, HF id or path")
    p.add_argument("--policy", default="fasa", help="the policy to calibrate (fasa)")
    p.add_argument("--samples", type=int, default=4, help="essay-haystack samples (default 4)")
    p.add_argument("--length", type=int, default=4096, help="tokens per sample (default 4096)")
    p.add_argument("--top-k", type=int, default=128, help="K of the top-K overlap (default 128)")
    p.add_argument("--queries", type=int, default=32, help="query positions per sample, over its second half")
    p.add_argument("--fraction", type=float, default=0.25, help="share of the D/2 FCs kept per head (0.25)")
    p.add_argument("--pairing", choices=PAIRINGS, default="hf", help="FC dim pairs: hf (i, i+D/2) or interleaved")
    p.add_argument("--selection", choices=SELECTIONS, default="single",
                   help="how the dominant FCs are chosen: single (each by its own overlap, the paper's ranking, "
                        "default) or combined (greedy for their summed score)")
    p.add_argument("--out", default=None, help="output JSON (default $TOKACCEL_CACHE/fasa/<model>.<pairing>.json)")
    p.set_defaults(func=_run)
