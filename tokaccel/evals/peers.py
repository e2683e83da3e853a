"""Peer methods run side by side with tokaccel policies on the same prompts (optional dependencies).

kvpress (NVIDIA/kvpress): spec `kvpress:<press>@<compression_ratio>[,field=value,...]`, e.g.
`kvpress:snapkv@0.5`, `kvpress:expected_attention@0.25`, `kvpress:streaming_llm@0.5,n_sink=4`.
`<press>` is a press class name with or without the "Press" suffix, case and underscores ignored
(snapkv -> SnapKVPress). As in kvpress's own pipeline, the press is applied as a context manager
(`with press(model):`) around the prefill of the context only, in one forward pass; the
question and the answer are then decoded on the compressed cache at their true positions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import warnings

import torch


# Presses whose score reads the attention weights the layer returns (kvpress asserts eager).
NEEDS_EAGER = {"ObservedAttentionPress"}


def kvpress_available() -> bool:
    return importlib.util.find_spec("kvpress") is not None


def _import_kvpress():
    try:
        import kvpress
    except ImportError as e:
        raise ImportError(
            "policy 'kvpress:...' needs the kvpress package: pip install kvpress "
            "(check that it keeps your torch build; it is an optional dependency of tokaccel)"
        ) from e
    return kvpress


def parse_kvpress_spec(spec: str) -> tuple[str, float | None, dict]:
    """"kvpress:snapkv@0.5,window_size=32" -> ("snapkv", 0.5, {"window_size": 32})."""
    from ..registry import parse_spec

    body = spec.strip()
    if not body.startswith("kvpress:"):
        raise ValueError(f"not a kvpress spec: {spec!r}")
    head, _, rest = body[len("kvpress:"):].partition(",")
    name, at, ratio = head.partition("@")
    if not name:
        raise ValueError(f"{spec!r}: expected kvpress:<press>@<ratio>")
    try:
        compression_ratio = float(ratio) if at else None
    except ValueError:
        raise ValueError(f"{spec!r}: compression ratio {ratio!r} is not a number") from None
    _, kwargs = parse_spec("x:" + rest) if rest else ("", {})
    return name, compression_ratio, kwargs


def press_classes(kvpress_module) -> dict[str, type]:
    """Normalized name -> press class for every `*Press` class kvpress exports."""
    out = {}
    for attr in dir(kvpress_module):
        obj = getattr(kvpress_module, attr)
        if attr.endswith("Press") and isinstance(obj, type):
            out[attr.lower()[: -len("press")]] = obj
    return out


def make_press(spec: str):
    """The kvpress press object for a spec (ImportError when kvpress is missing)."""
    name, ratio, kwargs = parse_kvpress_spec(spec)
    classes = press_classes(_import_kvpress())
    cls = classes.get(name.lower().replace("_", "").replace("-", "").removesuffix("press"))
    if cls is None:
        raise ValueError(f"unknown kvpress press {name!r}; available: {', '.join(sorted(classes))}")
    if ratio is not None:
        kwargs = {"compression_ratio": ratio, **kwargs}
    return cls(**kwargs)


class KVPressMethod:
    """A kvpress press as an eval method: the model stays unpatched; the press wraps the prefill."""

    kind = "kvpress"
    name = "kvpress"
    prefill_chunk = None  # a press compresses per forward call: prefill in one pass, like kvpress

    def __init__(self, spec: str):
        self.press = make_press(spec)
        self.label = spec.strip()

    def config(self) -> dict:
        if dataclasses.is_dataclass(self.press):
            fields = {f.name: getattr(self.press, f.name) for f in dataclasses.fields(self.press)}
        else:
            fields = {k: v for k, v in vars(self.press).items() if not k.startswith("_")}
        clean = {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v) for k, v in fields.items()}
        return {"press": type(self.press).__name__, **clean}

    @contextlib.contextmanager
    def session(self, model):
        """Presses that score from attention probabilities get eager attention for the session."""
        before = model.config._attn_implementation
        eager = type(self.press).__name__ in NEEDS_EAGER and before != "eager"
        if eager:
            model.set_attn_implementation("eager")
        try:
            yield
        finally:
            if eager:
                model.set_attn_implementation(before)

    @contextlib.contextmanager
    def prefill_context(self, model):
        with _past_key_values_alias(model), self.press(model):
            yield

    def stats(self, model) -> dict:
        return {}


@contextlib.contextmanager
def _past_key_values_alias(model):
    """kvpress (0.5.x, pinned to transformers < 5.3) reads the attention module's
    `past_key_values` and `cache_position` kwargs; transformers >= 5.3 passes the cache as `cache`
    and no positions. A forward pre-hook on every `self_attn` adds both (positions of the new
    tokens after what the layer holds); the attention forward ignores them (it takes **kwargs)."""

    def alias(module, args, kwargs):
        cache = kwargs.get("cache")
        if cache is not None and "past_key_values" not in kwargs:
            kwargs["past_key_values"] = cache
        if cache is not None and "cache_position" not in kwargs:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            past = cache.get_seq_length(module.layer_idx)
            kwargs["cache_position"] = torch.arange(past, past + hidden.shape[1], device=hidden.device)
        return args, kwargs

    handles = [m.register_forward_pre_hook(alias, with_kwargs=True)
               for name, m in model.named_modules() if name.endswith("self_attn")]
    try:
        with warnings.catch_warnings():  # transformers: "Both `past_key_values` and `cache` are set"
            warnings.filterwarnings("ignore", message="Both `past_key_values` and `cache`", category=FutureWarning)
            yield
    finally:
        for h in handles:
            h.remove()
