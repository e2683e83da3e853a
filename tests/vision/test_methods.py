"""Selection logic of the visual-pruning methods and the runtime's helpers."""

import pytest
import torch

import tokaccel
from tokaccel.patch import patch_state
from testkit.tiny_vlms import BUILDERS, IMG
from tokaccel.vision.runtime import compact, image_spans, keep_count, top_per_span
from tokaccel.vision.visionzip import zip_features


def test_image_spans_compact_top_per_span():
    image = torch.tensor([[0, 1, 1, 0, 1, 1, 1], [1, 1, 0, 0, 0, 1, 0]], dtype=torch.bool)
    span, lengths = image_spans(image)
    assert span.tolist() == [[-1, 0, 0, -1, 1, 1, 1], [2, 2, -1, -1, -1, 3, -1]]
    assert lengths.tolist() == [2, 3, 2, 1]
    scores = torch.tensor([[9.0, 1, 2, 9, 5, 5, 4], [3, 3, 9, 9, 9, 1, 9]])
    keep = top_per_span(scores, span, torch.tensor([1, 2, 1, 1]))
    assert keep.int().tolist() == [[0, 0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 1, 0]]
    idx, filled = compact(torch.tensor([[True, False, True], [True, True, True]]))
    assert idx.tolist() == [[0, 0, 2], [0, 1, 2]] and filled.tolist() == [[False, True, True], [True, True, True]]
    assert keep_count(0.25, torch.tensor([16, 5, 1])).tolist() == [4, 2, 1]
    assert keep_count(64, torch.tensor([576, 10])).tolist() == [64, 10]


def test_fastv_score_is_the_eager_last_row_attention():
    """The score FastV ranks by (captured from q/k rows under SDPA) equals the mean over heads of
    eager attention's last row at layer K - 1."""
    model, inputs = BUILDERS["llava"](images_per_row=(1, 2))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[1]  # layer K - 1 = 1
    model.set_attn_implementation("sdpa")
    tokaccel.patch_model(model, policy="fastv", keep=1.0, layer=2)
    with torch.no_grad():
        model(**inputs)
    pruner = patch_state(model).contexts[0].state
    torch.testing.assert_close(pruner.current.signals[1], attn[:, :, -1].mean(1), rtol=1e-4, atol=1e-6)


def test_fastv_keeps_the_most_attended_image_tokens():
    model, inputs = BUILDERS["llava"](images_per_row=(2,))
    tokaccel.patch_model(model, policy="fastv", keep=4, layer=2)
    with torch.no_grad():
        model(**inputs)
    pruner = patch_state(model).contexts[0].state
    scores = pruner.current.signals[1][0]
    image = (inputs["input_ids"][0] == IMG).nonzero().flatten()
    first, second = image[:16], image[16:]
    want = [sorted((scores[cols].topk(4).indices).tolist()) for cols in (first, second)]
    assert tokaccel.vision.last_selection(model) == want


def test_visionzip_merge_matches_the_official_formula():
    g = torch.Generator().manual_seed(0)
    feats, keys = torch.randn(2, 12, 5, generator=g), torch.randn(2, 13, 5, generator=g)
    cls = torch.rand(2, 2, 13, generator=g)
    out, kept = zip_features(feats, cls, keys, 6, 4 / 6)
    for b in range(2):
        dominant = cls[b, :, 1:].sum(0).topk(4).indices.tolist()
        rest = [i for i in range(12) if i not in dominant]
        targets = [rest[i] for i in range(0, len(rest), len(rest) // 2)][:2]
        assert kept[b].tolist() == sorted(dominant + targets)
        m = torch.nn.functional.normalize(keys[b, 1:], dim=-1)
        groups = {t: [] for t in targets}
        for i in rest:
            if i not in targets:
                groups[targets[int((m[targets] @ m[i]).argmax())]].append(i)
        for t, members in groups.items():
            want = feats[b, t] + (feats[b, members].mean(0) if members else 0)
            torch.testing.assert_close(out[b, t], want)
        untouched = [i for i in range(12) if i not in targets]
        assert torch.equal(out[b, untouched], feats[b, untouched])
    same, kept_all = zip_features(feats, cls, keys, 1.0, 54 / 64)
    assert torch.equal(same, feats) and kept_all.tolist() == [list(range(12))] * 2


def test_vtc_cls_keeps_the_patches_cls_attends_to_most():
    model, inputs = BUILDERS["llava"](images_per_row=(1,))
    tokaccel.patch_model(model, policy="vtc_cls", keep=3, layers=1)
    with torch.no_grad():
        model(**inputs)
    sel = tokaccel.vision.last_selection(model)
    tokaccel.unpatch_model(model)
    tower = model.model.vision_tower
    with torch.no_grad():
        hs = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    from tokaccel.vision.families import cls_attention

    # feature layer -2 of 3 encoder layers = encoder layer 1; its input is hidden_states[1]
    attn = cls_attention(tower.encoder.layers[1].self_attn, tower.encoder.layers[1].layer_norm1(hs[1]))
    assert sel == [sorted(attn[0].mean(0)[1:].topk(3).indices.tolist())]


@pytest.mark.parametrize("policy,extra", [("mmr", {"lam": 1.0, "importance": "norm"})])
def test_mmr_with_lam_one_is_top_importance(policy, extra):
    model, inputs = BUILDERS["qwen2_vl"](images_per_row=(1,))
    captured = {}
    text_model = model.model.language_model

    def grab(module, args, kwargs):
        captured.setdefault("x", kwargs["inputs_embeds"])

    h = text_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    h.remove()
    tokaccel.patch_model(model, policy=policy, keep=2, **extra)
    with torch.no_grad():
        model(**inputs)
    norms = captured["x"][0, inputs["input_ids"][0] == IMG].norm(dim=-1)
    assert tokaccel.vision.last_selection(model) == [sorted(norms.topk(2).indices.tolist())]


def test_mmr_text_importance_is_max_cosine_to_text_rows():
    from tokaccel.vision.mmr import importance_rows
    from tokaccel.vision.runtime import StageInput

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 5, generator=g)
    image = torch.tensor([[0, 1, 1, 0, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :2] = False
    inp = StageInput(hidden, image, image.long() - 1, torch.tensor([3]), torch.tensor([3]), valid,
                     torch.tensor([6, 6]), {})
    u = torch.nn.functional.normalize(hidden, dim=-1)
    for b in range(2):
        text = inp.text[b]
        want = (u[b] @ u[b, text].T).amax(-1)
        torch.testing.assert_close(importance_rows(inp, "text")[b], want)
