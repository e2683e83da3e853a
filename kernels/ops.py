"""tokaccel.kernels.ops: every public kernel op, with its dispatcher (import ops from here).

Why this folder has no ``__init__.py``: Hugging Face publishes a package named ``kernels``
that transformers (5.25+) imports. A regular package ``kernels/`` in a checkout would shadow it
whenever the repository root is on ``sys.path`` (``python -m pytest``, ``python -c`` from the
root), breaking ``import transformers``. A folder without ``__init__.py`` is only a PEP 420
namespace portion, which never wins over a regular package found anywhere on ``sys.path``. The
library reaches this folder as ``tokaccel.kernels`` through the symlink ``tokaccel/kernels ->
../kernels`` (so editable installs, wheels and a bare checkout all resolve it the same way; the
wheel holds real files). ``tests/test_packaging.py`` guards both.

Public ops pick a backend per call (see :mod:`tokaccel.kernels.dispatch`): Triton for
CUDA tensors, the torch reference otherwise; ``TRITON_INTERPRET=1`` runs Triton on
CPU tensors; ``backend="torch" | "triton"`` forces one. Importing this module only
defines things; without triton installed only the torch references are used.

Ops:
    grouped_scores(q [B, H, D], k [B, Hk, N, D], scale=None, *, backend=None) -> [B, H, N] fp32
    softmax_head_sum(...)           per-head softmax over tokens, summed over heads (TokenSelect soft vote)
    indexed_decode_attention(...)   decode attention over an index set (split-K), compact RoPE fused
    indexed_prefill_attention(...)  causal prefill-chunk attention over an index set, compact RoPE fused
    tree_draft(...), adjacency_update(...)   Token Recycling: draft a static tree; refresh the matrix
    greedy_select(x [S, N, D], n, k, first, importance=None, lam=0.0) -> [S, K]   DivPrune / MMR picks
    last_row_attention(q [B, H, D], k [B, Hk, N, D], scale, valid=None) -> [B, N]   FastV's score
    decode_attention_probs(q [B, H, D], k, v [B, Hk, N, D], scale, key_valid=None, *, backend=None)
        -> (out [B, H, D], probs [B, Hk, N] fp32)   decode attention + per-KV-head mean probabilities (H2O)
    attention_column_sums(q [B, H, S, D], k [B, Hk, N, D], scale, *, causal=True, ...) -> [B, Hk, N] fp32
                                    attention each key receives from S prefill queries (H2O)

    block_summaries(keys [B, Hk, N, D], valid, T, first_block=0) -> (mean, kmax, kmin, count)
                                    per-block key summaries (HISA / Quest block index)
    block_bound_scores(q [B, R, D], kmax, kmin, scale) -> [B, R, nb]   Quest's per-block upper bound
    block_token_scores(q [B, R, D], keys, blocks [B, M], T, scale) -> [B, R, M * T]
                                    logits of the tokens of chosen blocks only (HISA stage 2)
    fc_scores(q [B, R, D], keys_dom [B, Hk, N, d], dims [Hk, d], scale) -> [B, R, N]
                                    logits over each head's dominant dims only (FASA scoring)

    paged_indexed_attention(q [B, H, D], key_cache, value_cache [NB, BS, Hk, D], block_table [B, M],
                            idx [B, L], valid [B, L], scale) -> [B, H, D]
                                    decode attention over an index set read through vLLM's block tables
    paged_key_scores(q [B, H, D], key_cache [NB, BS, Hk, D], block_table [B, M], lengths [B]) -> [B, H, N]
                                    raw logits of every cached token through the block table (vLLM backend)

Submodules not imported here: ``tokaccel.kernels.aot`` (ahead-of-time compilation
report), ``tokaccel.kernels.testing`` (tolerances and random inputs for tests).
"""
from .dispatch import (
    BACKENDS,
    HAS_TRITON,
    KERNELS,
    OPS,
    AotConfig,
    KernelEntry,
    Op,
    get_op,
    interpret_enabled,
    list_kernels,
    list_ops,
    resolve_backend,
)
from .eviction import (
    attention_column_sums,
    attention_column_sums_reference,
    decode_attention_probs,
    decode_attention_probs_reference,
)
from .block_index import (
    block_bound_scores,
    block_bound_scores_reference,
    block_summaries,
    block_summaries_reference,
    block_token_scores,
    block_token_scores_reference,
)
from .fc_scores import fc_scores, fc_scores_reference
from .diversity import farthest_first, greedy_select, greedy_select_reference
from .last_row import last_row_attention, last_row_attention_reference
from .grouped_scores import grouped_scores, grouped_scores_reference
from .indexed_attention import (
    indexed_decode_attention,
    indexed_decode_attention_reference,
    indexed_prefill_attention,
    indexed_prefill_attention_reference,
)
from .paged_attention import (
    paged_indexed_attention,
    paged_indexed_attention_reference,
    paged_key_scores,
    paged_key_scores_reference,
)
from .recycling import adjacency_update, adjacency_update_reference, tree_draft, tree_draft_reference
from .soft_vote import softmax_head_sum, softmax_head_sum_reference

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "KERNELS",
    "OPS",
    "AotConfig",
    "KernelEntry",
    "Op",
    "get_op",
    "interpret_enabled",
    "list_kernels",
    "list_ops",
    "resolve_backend",
    "grouped_scores",
    "grouped_scores_reference",
    "softmax_head_sum",
    "softmax_head_sum_reference",
    "indexed_decode_attention",
    "indexed_decode_attention_reference",
    "indexed_prefill_attention",
    "indexed_prefill_attention_reference",
    "tree_draft",
    "tree_draft_reference",
    "adjacency_update",
    "adjacency_update_reference",
    "decode_attention_probs",
    "decode_attention_probs_reference",
    "attention_column_sums",
    "attention_column_sums_reference",
    "greedy_select",
    "greedy_select_reference",
    "farthest_first",
    "last_row_attention",
    "last_row_attention_reference",
    "block_summaries",
    "block_summaries_reference",
    "block_bound_scores",
    "block_bound_scores_reference",
    "block_token_scores",
    "block_token_scores_reference",
    "fc_scores",
    "fc_scores_reference",
    "paged_indexed_attention",
    "paged_indexed_attention_reference",
    "paged_key_scores",
    "paged_key_scores_reference",
]
