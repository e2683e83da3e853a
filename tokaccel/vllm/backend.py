"""vLLM's CPU attention backend with tokaccel's decode-time token selection.

`TokaccelCPUBackend` subclasses vLLM's `CPUAttentionBackend` (vllm/v1/attention/backends/
cpu_attn.py). Its metadata builder splits each batch: a request decoding one token over more
tokens than the policy's budget is *sparse*, every other request (prefill, chunked prefill, short
decodes) is *dense* and gets vLLM's own metadata for that subset. Its impl, per layer, runs vLLM's
kernel on the dense tokens and `PagedSelector.decode` on each sparse one; layers the policy leaves
dense (Quest's first two) run vLLM's kernel on the whole batch.

The classes subclass vLLM's, so they are built on first access (module `__getattr__`): importing
this module does not import vLLM, and vLLM's `resolve_obj_by_qualname` still finds
"tokaccel.vllm.backend.TokaccelCPUBackend".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

READABLE_ISAS = ("vec", "vec16")  # the KV layouts `tokaccel.vllm.paged` reads (see its docstring)
PRUNE_EVERY = 64  # layer calls between sweeps of finished requests' states
_POLICIES: dict = {}  # spec -> policy, one per process
_CLASSES: dict = {}  # name -> class, built on first access


@dataclass
class DecodeSplit:
    """Which requests of a batch decode sparsely. sparse_reqs / sparse_tokens / sparse_lens: the
    request index, its query token row and its sequence length; dense_tokens [T_d] long: the query
    rows of the other requests (None: there are none); dense: vLLM's metadata for those."""

    sparse_reqs: list[int]
    sparse_tokens: list[int]
    sparse_lens: list[int]
    dense_tokens: torch.Tensor | None
    dense: object | None


def sparse_requests(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, threshold: int) -> torch.Tensor:
    """[R] bool: requests that decode one token over more than `threshold` tokens.
    query_start_loc [R + 1], seq_lens [R] (CPU)."""
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    return (query_lens == 1) & (seq_lens > threshold)


def _policy_for(vllm_config):
    """The configured SelectionPolicy (or None), made once per process and config."""
    from . import make_vllm_policy, policy_spec

    spec = policy_spec(getattr(vllm_config, "additional_config", None) if vllm_config is not None else None)
    if spec is None:
        return None
    if spec not in _POLICIES:
        _POLICIES[spec] = make_vllm_policy(spec)
        logger.info("tokaccel.vllm: decode selection with %s", _POLICIES[spec])
    return _POLICIES[spec]


def _build_classes() -> dict:
    from vllm import _custom_ops as ops
    from vllm import envs
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                     CPUAttentionMetadata, CPUAttentionMetadataBuilder)

    from .paged import PagedSelector, split_kv_cache

    @dataclass
    class TokaccelCPUMetadata(CPUAttentionMetadata):
        split: DecodeSplit | None = None

    class TokaccelCPUMetadataBuilder(CPUAttentionMetadataBuilder):
        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            self.policy = _policy_for(vllm_config)

        def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
            meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
            if self.policy is None or self.is_cross_attention or self.is_encoder_only_attention:
                return meta
            cm = common_attn_metadata
            qsl, seq_lens = cm.query_start_loc_cpu, cm.seq_lens.cpu()
            threshold = self.policy.budget if self.policy.dense_fallback else 0
            sparse = sparse_requests(qsl, seq_lens, threshold)
            if not bool(sparse.any()):
                return meta
            reqs = sparse.nonzero()[:, 0]
            split = DecodeSplit(reqs.tolist(), qsl[reqs].tolist(), seq_lens[reqs].tolist(), None, None)
            dense = (~sparse).nonzero()[:, 0]
            if dense.numel():
                split.dense_tokens, split.dense = self._dense_part(common_prefix_len, cm, dense, fast_build)
            fields = {name: getattr(meta, name) for name in CPUAttentionMetadata.__dataclass_fields__}
            return TokaccelCPUMetadata(**fields, split=split)

        def _dense_part(self, common_prefix_len, cm, dense: torch.Tensor, fast_build: bool):
            """(query rows [T_d], vLLM's metadata) of the requests `dense` [R_d] alone."""
            qsl = cm.query_start_loc_cpu
            lens = (qsl[1:] - qsl[:-1])[dense]
            tokens = torch.cat([torch.arange(int(qsl[r]), int(qsl[r + 1])) for r in dense.tolist()])
            new_qsl = torch.zeros(len(dense) + 1, dtype=qsl.dtype)
            new_qsl[1:] = lens.cumsum(0)
            seq_lens = cm.seq_lens[dense]

            def pick(t):
                return None if t is None else t[dense]

            sub = cm.replace(
                query_start_loc=new_qsl.to(cm.query_start_loc.device), query_start_loc_cpu=new_qsl,
                seq_lens=seq_lens, num_reqs=len(dense), num_actual_tokens=len(tokens),
                max_query_len=int(lens.max()), max_seq_len=int(seq_lens.max()),
                block_table_tensor=cm.block_table_tensor[dense], slot_mapping=cm.slot_mapping[tokens],
                positions=None if cm.positions is None else cm.positions[tokens],
                is_prefilling=pick(cm.is_prefilling), seq_lens_cpu_upper_bound=pick(cm.seq_lens_cpu_upper_bound),
                req_idx=None if cm.req_idx is None else cm.req_idx[dense.numpy()],
                _num_computed_tokens_cache=None, _token_to_req_indices_cache=None)
            return tokens, super().build(0, sub, fast_build)

    class TokaccelCPUImpl(CPUAttentionBackendImpl):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.policy = _policy_for(get_current_vllm_config())
            self.selector: PagedSelector | None = None

        def _selector(self, layer) -> PagedSelector | None:
            if self.selector is None:
                isa = getattr(layer, "isa", None)
                if isa not in READABLE_ISAS or self.kv_cache_dtype != "auto" or self.sliding_window != -1 \
                        or self.logits_soft_cap or self.alibi_slopes is not None or self.sinks is not None:
                    logger.warning("tokaccel.vllm: layer %s stays dense (isa %s, kv cache %s, window %s: only "
                                   "plain causal attention in the %s layouts is read)", layer.layer_name, isa,
                                   self.kv_cache_dtype, self.sliding_window, READABLE_ISAS)
                    self.policy = None
                    return None
                self.selector = PagedSelector(self.policy, extract_layer_index(layer.layer_name), self.num_heads,
                                              self.num_kv_heads, self.head_size, self.scale)
            return self.selector

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                    output_block_scale=None):
            split = getattr(attn_metadata, "split", None)
            if split is None or self.policy is None or self.attn_type != AttentionType.DECODER:
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                       output_block_scale)
            selector = self._selector(layer)
            if selector is None or not selector.active:
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                       output_block_scale)
            if split.dense is not None:
                rows = split.dense_tokens
                dense_out = output.new_empty((len(rows), *output.shape[1:]))
                super().forward(layer, query.index_select(0, rows), key, value, kv_cache, split.dense, dense_out,
                                output_scale, output_block_scale)
                output.index_copy_(0, rows, dense_out)
            key_cache, value_cache = split_kv_cache(kv_cache)
            block_table = attn_metadata.block_table
            if selector.reads_blocks(kv_cache.shape[2]):
                self._block_decode(layer, selector, query, kv_cache, key_cache, block_table, split, output)
            else:
                for req, token, n in zip(split.sparse_reqs, split.sparse_tokens, split.sparse_lens):
                    output[token] = selector.decode(query[token], key_cache, value_cache, block_table[req], n)
            selector.calls += 1
            if selector.calls % PRUNE_EVERY == 0:
                selector.prune()
            return output

        def _block_decode(self, layer, selector, query, kv_cache, key_cache, block_table, split, output):
            """Sparse requests whose selections are whole blocks: one call of vLLM's kernel over
            each request's shorter block table (keys carry their RoPE, so block order is free)."""
            rows, lens = [], []
            for req, token, n in zip(split.sparse_reqs, split.sparse_tokens, split.sparse_lens):
                row, tokens = selector.block_row(query[token], key_cache, block_table[req], n)
                rows.append(row)
                lens.append(tokens)
            table = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(block_table.dtype)
            seq_lens = torch.tensor(lens, dtype=torch.int32)
            starts = torch.arange(len(rows) + 1, dtype=torch.int32)
            tokens = torch.tensor(split.sparse_tokens)
            scheduler = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(rows), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                head_dim=self.head_size, seq_lens=seq_lens, dtype=query.dtype, query_start_loc=starts, causal=True,
                sliding_window_size=-1, isa=layer.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                kv_cache_dtype=self.kv_cache_dtype)
            nb, Hk, bs, _ = kv_cache.shape
            parent_key, parent_value = kv_cache.view(nb, Hk, 2 * bs, -1).chunk(2, dim=2)
            out = output.new_empty((len(rows), *output.shape[1:]))
            ops.cpu_attention_with_kv_cache(
                query=query.index_select(0, tokens), key_cache=parent_key, value_cache=parent_value, output=out,
                query_start_loc=starts, seq_lens=seq_lens, scale=self.scale, causal=True, alibi_slopes=None,
                sliding_window=-1, block_table=table, softcap=0, scheduler_metadata=scheduler, s_aux=None,
                k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype)
            output.index_copy_(0, tokens, out)

    class TokaccelCPUBackend(CPUAttentionBackend):
        @staticmethod
        def get_impl_cls():
            return TokaccelCPUImpl

        @staticmethod
        def get_builder_cls():
            return TokaccelCPUMetadataBuilder

    classes = {"TokaccelCPUBackend": TokaccelCPUBackend, "TokaccelCPUImpl": TokaccelCPUImpl,
               "TokaccelCPUMetadataBuilder": TokaccelCPUMetadataBuilder, "TokaccelCPUMetadata": TokaccelCPUMetadata}
    for name, cls in classes.items():
        cls.__module__, cls.__qualname__ = __name__, name
    return classes


def __getattr__(name: str):
    """TokaccelCPUBackend & co., built (importing vLLM) on first access."""
    if name.startswith("TokaccelCPU"):
        if not _CLASSES:
            _CLASSES.update(_build_classes())
        if name in _CLASSES:
            return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
