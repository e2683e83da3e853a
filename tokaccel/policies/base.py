"""The policy contract: what every tokaccel policy provides to the patching layer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..stats import Stats

TREE_KWARG = "tokaccel_tree"  # forward kwarg carrying a draft tree (tokaccel.recycling) to `Policy.attend`


@dataclass(frozen=True)
class LayerInfo:
    """Static facts about one attention layer, read from the model once at patch time."""

    layer_idx: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None  # None for full (global) attention layers
    layer_type: str  # "full_attention", "sliding_attention", ... (HF `config.layer_types`)

    @property
    def groups(self) -> int:
        """G: query heads per KV head; query head h reads KV head h // G."""
        return self.num_heads // self.num_kv_heads


@dataclass
class LayerContext:
    """What the attention entry finds on a patched module: its policy (None = dense) and per-layer state."""

    info: LayerInfo
    policy: "Policy | None"
    stats: Stats
    module: torch.nn.Module = field(default=None, repr=False, compare=False)  # the patched attention module
    state: Any = None
    mask_kind: str = "sdpa"  # which mask function built `attention_mask`: "sdpa" or "flash"
    # Filled by a forward pre-hook when the policy sets `captures_layer_inputs`:
    # "cache" and "position_embeddings" (cos, sin) of the current call.
    inputs: dict = field(default_factory=dict)
    # Callables told of every selection a selection policy makes on this layer (tokaccel.probe).
    probes: list = field(default_factory=list, repr=False, compare=False)


@dataclass
class Policy:
    """Base class. Subclasses are dataclasses whose fields are the policy's documented config.

    A subclass sets `name` and `description`, validates its fields in `validate()` (raising
    ValueError that names the field and the valid range), and implements `attend()`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # Set True when `attend` needs the cache object and (cos, sin) of the current call.
    captures_layer_inputs: ClassVar[bool] = False
    # Set True when `attend` hands a speculative draft tree passed as the `tokaccel_tree` kwarg
    # to it (`tokaccel.recycling.verify.TreeVerification.attend`), which verifies it exactly as
    # sequential decoding would. Other non-dense policies are refused by tree verification.
    verifies_trees: ClassVar[bool] = False
    # Set True when `attend` is the model's own masked attention over every key (Dense): a draft
    # tree's 4-D mask then verifies it with no help from the policy. Not inherited: a subclass may
    # change `attend`, so it declares this again (see __init_subclass__).
    attends_through_mask: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "attends_through_mask" not in cls.__dict__:
            cls.attends_through_mask = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for invalid config values."""

    def config(self) -> dict:
        """The policy's configuration as a plain dict (for result folders and reports)."""
        return dataclasses.asdict(self)

    def provenance(self) -> dict:
        """What the patched policy loaded besides its config (e.g. FASA's calibration file and
        its settings), recorded beside the config in eval results; {} when nothing."""
        return {}

    def applies_to(self, layer: LayerInfo) -> bool:
        """Whether this policy runs on `layer`; other layers stay dense. Default: full-attention
        layers only, so sliding-window layers (Gemma3, Mistral) keep their own window."""
        return layer.sliding_window is None

    def mask_kind(self, model: torch.nn.Module) -> str:
        """Which attention mask the model should build: "sdpa" (4-D bool or None) or "flash"."""
        return "sdpa"

    def new_layer_state(self, layer: LayerInfo) -> Any:
        """Per-layer state created at patch time (None when the policy needs none)."""
        return None

    def on_patch(self, model: torch.nn.Module, contexts: list[LayerContext]) -> list:
        """Install extra hooks; return removable handles. Called once, after the layers are set up."""
        return []

    def attend(
        self,
        ctx: LayerContext,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One attention call, HF's contract: query [B, H, q, D], key/value [B, Hk, kv, D] (cache
        included, RoPE applied) -> (out [B, q, H, D], None)."""
        raise NotImplementedError

    def __str__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{self.name}({fields})"
