"""tokaccel.probe.record_selections: records only inside its block, one record per selection, and
the recorded rows are the ones the policy chose and the layer's attention read."""

import pytest
import torch

import tokaccel
from tokaccel.policies import TokenSelect
from tokaccel.probe import record_selections
from tokaccel.selection import soft_vote, top_k

from testkit.models import tiny_model

K = 8
POLICY = dict(k=K, n_init=4, n_local=8, chunk=16, theta=1.0)  # theta=1: every decode step selects anew


def _generate(model, steps=3, length=40):
    ids = torch.randint(1, 128, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              return_dict_in_generate=True)


def test_records_only_inside_the_block():
    model = tiny_model()
    with tokaccel.patched(model, TokenSelect(**POLICY)):
        _generate(model)  # before the block: not recorded
        with record_selections(model) as records:
            _generate(model)
        seen = len(records)
        _generate(model)  # after the block: not recorded
    assert seen > 0
    assert len(records) == seen


def test_decode_records_hold_the_rows_attention_read():
    model = tiny_model()
    steps, layers = 3, model.config.num_hidden_layers
    with tokaccel.patched(model, TokenSelect(**POLICY)), record_selections(model, keys=True) as records:
        out = _generate(model, steps=steps)
    decode = [r for r in records if r.queries == 1]
    assert len(decode) == (steps - 1) * layers  # the first new token comes from the prefill
    prefill = records[:len(records) - len(decode)]  # the prompt's chunks select first, all queries of a chunk
    assert prefill and all(r.queries > 1 for r in prefill)
    for r in decode:
        rows = r.rows[0][r.rows_valid[0]]
        assert r.cached and r.scoring_query.dim() == 3
        assert 0 < len(rows) <= K
        assert bool(((rows >= r.start) & (rows < r.end)).all())
        assert bool((rows[1:] > rows[:-1]).all())
        B, Hk, N, D = r.keys.shape
        assert (B, Hk, D) == (1, model.config.num_key_value_heads, model.config.head_dim)
        assert N >= r.end
        # the recorded rows are the soft vote's top-k for the recorded inputs
        want, want_valid = top_k(soft_vote(r.scoring_query, r.keys[:, :, r.start:r.end], r.scale, r.valid), K)
        assert r.chosen() == set((want[0][want_valid[0]] + r.start).tolist())
    for layer in range(layers):  # the last decode step read the rows of the layer's selection cache
        last = [r for r in decode if r.layer_idx == layer][-1]
        state = out.past_key_values.layers[layer].selection
        assert torch.equal(state.mid[state.mid_valid], last.rows[last.rows_valid])


def test_keys_only_on_request():
    model = tiny_model()
    with tokaccel.patched(model, TokenSelect(**POLICY)), record_selections(model) as records:
        _generate(model)
    assert records and all(r.keys is None for r in records)


def test_an_unpatched_model_raises():
    with pytest.raises(ValueError):
        with record_selections(tiny_model()):
            pass
