"""vLLM's attention backends with tokaccel's decode-time token selection.

`TokaccelCPUBackend` subclasses vLLM's `CPUAttentionBackend` (vllm/v1/attention/backends/
cpu_attn.py); `TokaccelCUDABackend` its `TritonAttentionBackend` (triton_attn.py; registered as
the CUSTOM backend, not yet run on a GPU). Each metadata builder splits a batch: a request decoding one token over more
tokens than the policy's budget is *sparse*, every other request (prefill, chunked prefill, short
decodes) is *dense* and gets vLLM's own metadata for that subset. Its impl, per layer, runs vLLM's
kernel on the dense tokens and `PagedSelector` on the sparse ones (on CUDA: one
`paged_indexed_attention` kernel call for all of them); layers the policy leaves dense (Quest's
first two) run vLLM's kernel on the whole batch.

The classes subclass vLLM's, so they are built on first access (module `__getattr__`): importing
this module does not import vLLM, and vLLM's `resolve_obj_by_qualname` still finds
"tokaccel.vllm.backend.TokaccelCPUBackend".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

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
    rows of the other requests (None: there are none); dense: vLLM's metadata for those.
    reused: what every layer of the step derives alike (the CPU backend's kernel arguments)."""

    sparse_reqs: list[int]
    sparse_tokens: list[int]
    sparse_lens: list[int]
    dense_tokens: torch.Tensor | None
    dense: object | None
    reused: dict = field(default_factory=dict)


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


def _split_builder(parent_builder, parent_metadata):
    """A subclass of vLLM's metadata builder `parent_builder` whose metadata (a subclass of
    `parent_metadata` with a `split` field) says which requests decode sparsely, with vLLM's own
    metadata for the other requests alone."""

    @dataclass
    class Metadata(parent_metadata):
        split: DecodeSplit | None = None

    class Builder(parent_builder):
        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            self.policy = _policy_for(vllm_config)

        @classmethod
        def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
            """NEVER with a policy: selection runs Python per step, which a captured graph would
            freeze (vLLM then leaves attention out of its CUDA graphs); else the parent's."""
            if _policy_for(vllm_config) is not None:
                from vllm.v1.attention.backend import AttentionCGSupport

                return AttentionCGSupport.NEVER
            return super().get_cudagraph_support(vllm_config, kv_cache_spec)

        def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
            meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
            if self.policy is None or getattr(self, "is_cross_attention", False) \
                    or getattr(self, "is_encoder_only_attention", False):
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
                split.dense_tokens, split.dense = self._dense_part(cm, dense, fast_build)
            fields = {name: getattr(meta, name) for name in parent_metadata.__dataclass_fields__}
            return Metadata(**fields, split=split)

        def _dense_part(self, cm, dense: torch.Tensor, fast_build: bool):
            """(query rows [T_d], vLLM's metadata) of the requests `dense` [R_d] alone."""
            qsl = cm.query_start_loc_cpu
            lens = (qsl[1:] - qsl[:-1])[dense]
            tokens = torch.cat([torch.arange(int(qsl[r]), int(qsl[r + 1])) for r in dense.tolist()])
            new_qsl = torch.zeros(len(dense) + 1, dtype=qsl.dtype)
            new_qsl[1:] = lens.cumsum(0)
            device = cm.query_start_loc.device
            rows, token_rows = dense.to(device), tokens.to(device)
            seq_lens = cm.seq_lens[rows]

            def pick(t):
                return None if t is None else t[dense.to(t.device)]

            sub = cm.replace(
                query_start_loc=new_qsl.to(device), query_start_loc_cpu=new_qsl,
                seq_lens=seq_lens, num_reqs=len(dense), num_actual_tokens=len(tokens),
                max_query_len=int(lens.max()), max_seq_len=int(seq_lens.max()),
                block_table_tensor=cm.block_table_tensor[rows], slot_mapping=cm.slot_mapping[token_rows],
                positions=None if cm.positions is None else cm.positions[token_rows],
                is_prefilling=pick(cm.is_prefilling), seq_lens_cpu_upper_bound=pick(cm.seq_lens_cpu_upper_bound),
                req_idx=None if cm.req_idx is None else cm.req_idx[dense.numpy()],
                _num_computed_tokens_cache=None, _token_to_req_indices_cache=None)
            return token_rows, super().build(0, sub, fast_build)

    return Builder, Metadata


def _split_impl(parent_impl, layout, split_cache, plain_layer):
    """A subclass of vLLM's attention impl `parent_impl`: vLLM's kernel on the dense requests of a
    batch (`split.dense`), `PagedSelector` on the sparse ones. `layout` / `split_cache(kv_cache)`:
    how the layer's cache is read; `plain_layer(impl, layer)`: None when tokaccel can read the
    layer, else why not (the layer then stays dense)."""
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.attention.backend import AttentionType

    from .paged import PagedSelector

    class Impl(parent_impl):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.policy = _policy_for(get_current_vllm_config())
            self.selector: PagedSelector | None = None

        def _selector(self, layer) -> PagedSelector | None:
            if self.selector is None:
                why = plain_layer(self, layer)
                if why is not None:
                    logger.warning("tokaccel.vllm: layer %s stays dense (%s)", layer.layer_name, why)
                    self.policy = None
                    return None
                self.selector = PagedSelector(self.policy, extract_layer_index(layer.layer_name), self.num_heads,
                                              self.num_kv_heads, self.head_size, self.scale, layout=layout)
            return self.selector

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                    output_block_scale=None):
            split = getattr(attn_metadata, "split", None)
            selector = None
            if split is not None and self.policy is not None and self.attn_type == AttentionType.DECODER:
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
            self._sparse(layer, selector, query, kv_cache, attn_metadata.block_table, split, output)
            selector.calls += 1
            if selector.calls % PRUNE_EVERY == 0:
                selector.prune()
            return output

        def _sparse(self, layer, selector, query, kv_cache, block_table, split, output):
            """Each sparse request's query over its selected rows."""
            key_cache, value_cache = split_cache(kv_cache)
            for req, token, n in zip(split.sparse_reqs, split.sparse_tokens, split.sparse_lens):
                output[token] = selector.decode(query[token], key_cache, value_cache, block_table[req], n)

    return Impl


def _cpu_plain_layer(impl, layer) -> str | None:
    isa = getattr(layer, "isa", None)
    if isa not in READABLE_ISAS or impl.kv_cache_dtype != "auto" or impl.sliding_window != -1 \
            or impl.logits_soft_cap or impl.alibi_slopes is not None or impl.sinks is not None:
        return (f"isa {isa}, kv cache {impl.kv_cache_dtype}, window {impl.sliding_window}: only plain causal "
                f"attention in the {READABLE_ISAS} layouts is read")
    return None


def _cuda_plain_layer(impl, layer) -> str | None:
    window = getattr(impl, "sliding_window", None)
    if impl.kv_cache_dtype != "auto" or window not in (None, -1, (-1, -1)) or getattr(impl, "logits_soft_cap", 0) \
            or getattr(impl, "alibi_slopes", None) is not None or getattr(impl, "sinks", None) is not None:
        return f"kv cache {impl.kv_cache_dtype}, window {window}: only plain causal attention is read"
    return None


def _build_cpu_classes() -> dict:
    from vllm import _custom_ops as ops
    from vllm import envs
    from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                     CPUAttentionMetadata, CPUAttentionMetadataBuilder)

    from .paged import VecLayout, split_kv_cache

    Builder, Metadata = _split_builder(CPUAttentionMetadataBuilder, CPUAttentionMetadata)
    Base = _split_impl(CPUAttentionBackendImpl, VecLayout, split_kv_cache, _cpu_plain_layer)

    class Impl(Base):
        def _sparse(self, layer, selector, query, kv_cache, block_table, split, output):
            if selector.reads_blocks(kv_cache.shape[2]):
                self._block_decode(layer, selector, query, kv_cache, block_table, split, output)
            else:
                super()._sparse(layer, selector, query, kv_cache, block_table, split, output)

        def _block_decode(self, layer, selector, query, kv_cache, block_table, split, output):
            """Sparse requests whose selections are whole blocks: one call of vLLM's kernel over
            each request's shorter block table (keys carry their RoPE, so block order is free)."""
            key_cache, _ = split_kv_cache(kv_cache)
            rows, lens = [], []
            for req, token, n in zip(split.sparse_reqs, split.sparse_tokens, split.sparse_lens):
                row, tokens = selector.block_row(query[token], key_cache, block_table[req], n)
                rows.append(row)
                lens.append(tokens)
            table = rows[0][None] if len(rows) == 1 else torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
            reused = split.reused
            if "tokens" not in reused:
                reused["tokens"] = torch.tensor(split.sparse_tokens)
                reused["starts"] = torch.arange(len(rows) + 1, dtype=torch.int32)
            tokens, starts = reused["tokens"], reused["starts"]
            key = ("scheduler", tuple(lens))  # the layers' selections mostly hold as many tokens
            if key not in reused:
                seq_lens = torch.tensor(lens, dtype=torch.int32)
                reused[key] = seq_lens, ops.cpu_attn_get_scheduler_metadata(
                    num_reqs=len(rows), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                    head_dim=self.head_size, seq_lens=seq_lens, dtype=query.dtype, query_start_loc=starts,
                    causal=True, sliding_window_size=-1, isa=layer.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                    kv_cache_dtype=self.kv_cache_dtype)
            seq_lens, scheduler = reused[key]
            nb, Hk, bs, _ = kv_cache.shape
            parent_key, parent_value = kv_cache.view(nb, Hk, 2 * bs, -1).chunk(2, dim=2)
            out = output.new_empty((len(rows), *output.shape[1:]))
            ops.cpu_attention_with_kv_cache(
                query=query.index_select(0, tokens), key_cache=parent_key, value_cache=parent_value, output=out,
                query_start_loc=starts, seq_lens=seq_lens, scale=self.scale, causal=True, alibi_slopes=None,
                sliding_window=-1, block_table=table.to(block_table.dtype), softcap=0, scheduler_metadata=scheduler, s_aux=None,
                k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype)
            output.index_copy_(0, tokens, out)

    class Backend(CPUAttentionBackend):
        @staticmethod
        def get_impl_cls():
            return Impl

        @staticmethod
        def get_builder_cls():
            return Builder

    return {"TokaccelCPUBackend": Backend, "TokaccelCPUImpl": Impl, "TokaccelCPUMetadataBuilder": Builder,
            "TokaccelCPUMetadata": Metadata}


def _build_cuda_classes() -> dict:
    """The CUDA backend: vLLM's Triton backend with sparse decode through
    `tokaccel.kernels.paged_attention` (selection per request, one kernel call per layer for
    all sparse requests). Registered as vLLM's CUSTOM backend (`--attention-backend CUSTOM`).
    Not yet run on a GPU: its parts are tested on CPU (tests/test_vllm_paged.py, the kernels'
    interpreter tests)."""
    from vllm.v1.attention.backends.triton_attn import (TritonAttentionBackend, TritonAttentionImpl,
                                                        TritonAttentionMetadata, TritonAttentionMetadataBuilder)

    from .paged import NHDLayout, split_nhd

    Builder, Metadata = _split_builder(TritonAttentionMetadataBuilder, TritonAttentionMetadata)
    Base = _split_impl(TritonAttentionImpl, NHDLayout, split_nhd, _cuda_plain_layer)

    class Impl(Base):
        def _sparse(self, layer, selector, query, kv_cache, block_table, split, output):
            from ..kernels.paged_attention import paged_indexed_attention

            key_cache, value_cache = split_nhd(kv_cache)
            picked = [selector.indices(query[token], key_cache, block_table[req], n)
                      for req, token, n in zip(split.sparse_reqs, split.sparse_tokens, split.sparse_lens)]
            idx = torch.nn.utils.rnn.pad_sequence([i for i, _ in picked], batch_first=True)
            valid = torch.nn.utils.rnn.pad_sequence([v for _, v in picked], batch_first=True)
            tokens = torch.tensor(split.sparse_tokens, device=query.device)
            reqs = torch.tensor(split.sparse_reqs, device=block_table.device)
            out = paged_indexed_attention(query.index_select(0, tokens), key_cache, value_cache,
                                          block_table.index_select(0, reqs), idx, valid, self.scale)
            output.index_copy_(0, tokens, out.to(output.dtype))

    class Backend(TritonAttentionBackend):
        @staticmethod
        def get_name() -> str:
            return "CUSTOM"

        @staticmethod
        def get_impl_cls():
            return Impl

        @staticmethod
        def get_builder_cls():
            return Builder

    return {"TokaccelCUDABackend": Backend, "TokaccelCUDAImpl": Impl, "TokaccelCUDAMetadataBuilder": Builder,
            "TokaccelCUDAMetadata": Metadata}


_BUILDERS = {"TokaccelCPU": _build_cpu_classes, "TokaccelCUDA": _build_cuda_classes}


def __getattr__(name: str):
    """TokaccelCPUBackend, TokaccelCUDABackend & co., built (importing vLLM) on first access."""
    for prefix, build in _BUILDERS.items():
        if name.startswith(prefix):
            if not any(key.startswith(prefix) for key in _CLASSES):
                for key, cls in build().items():
                    cls.__module__, cls.__qualname__, cls.__name__ = __name__, key, key
                    _CLASSES[key] = cls
            if name in _CLASSES:
                return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
