"""The selection engine on plain tensors (no model, no HF object): what another serving engine
(vLLM) reuses. Every registered selection policy's scorer, run through `SelectionCall`, reads the
whole context when its budget covers it (same output as dense attention) and a subset otherwise."""

import pytest
import torch

from tokaccel.policies.base import LayerContext, LayerInfo
from tokaccel.policies.engine import SelectionCall, SelectionPolicy
from tokaccel.registry import REGISTRY, make_policy
from tokaccel.stats import Stats

SELECTION = sorted(name for name, cls in REGISTRY.items() if issubclass(cls, SelectionPolicy))
SMALL = "n_init=4,n_local=8,position_mode=original,dense_fallback=False"
EXTRA = {"hisa": ",block=8,m=16", "quest": ",page=8"}


def _call(policy: SelectionPolicy, n: int, seed: int = 0) -> tuple[SelectionCall, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B, H, Hk, D = 2, 4, 2, 16
    q, k, v = (torch.randn(B, h, s, D, generator=g) for h, s in ((H, 1), (Hk, n), (Hk, n)))
    info = LayerInfo(0, H, Hk, D, None, "full_attention")
    ctx = LayerContext(info, policy, Stats(), state=policy.standalone_state(info, None))
    return SelectionCall(policy, ctx, q, k, v, None, D ** -0.5), k, v


def _dense(q, k, v):
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def test_every_selection_policy_is_listed():
    assert {"tokenselect", "hisa", "quest", "fasa"} <= set(SELECTION)


@pytest.mark.parametrize("name", SELECTION)
def test_a_covering_budget_reads_every_key_without_a_model(name):
    n = 100
    policy = make_policy(f"{name}:k={n},{SMALL}{EXTRA.get(name, '')}")
    call, k, v = _call(policy, n)
    out = call.decode(None)  # [B, 1, H, D]
    torch.testing.assert_close(out, _dense(call.query, k, v), atol=1e-5, rtol=1e-5)
    assert call.ctx.stats["keys_read"] == 2 * n


@pytest.mark.parametrize("name", SELECTION)
def test_a_small_budget_reads_sinks_selection_and_window(name):
    n, k = 200, 16
    policy = make_policy(f"{name}:k={k},{SMALL}{EXTRA.get(name, '')}")
    call, _, _ = _call(policy, n, seed=1)
    rows, valid = call.select(call.scoring_query(call.query[:, :, 0]), n - policy.n_local)
    assert rows.shape[1] <= k and bool(valid.any())
    chosen = rows[valid]
    assert bool(((chosen >= policy.n_init) & (chosen < n - policy.n_local)).all())
    call.decode(None)
    assert 0 < call.ctx.stats["keys_read"] <= 2 * (policy.n_init + k + policy.n_local)
