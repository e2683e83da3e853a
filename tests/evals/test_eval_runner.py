"""The runner end to end on SmolLM2 at tiny lengths, result folders, reuse of a prefilled context,
the CLI and the plots."""

import json
import warnings

import pytest

import tokaccel
from tokaccel.evals import make_samples, run_eval, summary_table
from tokaccel.evals.decoding import eos_ids, greedy, prefill
from tokaccel.evals.runner import (PolicyMethod, answer_questions, collect_results, length_tables, make_method,
                                   policy_label, result_dir)
from tokaccel.policies import split_specs
from tokaccel.evals.tasks import get_task


@pytest.fixture(scope="module")
def passkey_run(smol, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    results = run_eval(smol, policies=["dense", "none"], tasks=["passkey"], lengths=[256], samples=2, out=out, progress=False)
    return out, results


def test_run_writes_the_three_files(passkey_run):
    out, results = passkey_run
    assert [r["policy_label"] for r in results] == ["dense", "none"] and not any(r["skipped"] for r in results)
    folder = out / "smollm2-135m-instruct" / "passkey" / "256"
    dense_dir = next(folder.glob("dense-*"))
    assert sorted(p.name for p in dense_dir.iterdir()) == ["config.json", "metrics.json", "predictions.jsonl"]
    config = json.loads((dense_dir / "config.json").read_text())
    assert config["model"] == "smollm2-135m-instruct" and config["task"] == "passkey" and config["length"] == 256
    assert config["policy"] == "dense" and config["policy_config"] == {"backend": "auto"} and config["samples"] == 2
    assert config["chat_template_used"] is True and set(config["versions"]) >= {"tokaccel", "torch", "transformers"}
    metrics = json.loads((dense_dir / "metrics.json").read_text())
    rows = [json.loads(line) for line in (dense_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["prompt_tokens"] == 256 for r in rows)
    assert [r["depth"] for r in rows] == [0.0, 1.0] and all(r["answers"][0] in json.dumps(r["info"]) for r in rows)
    assert metrics["score"] == pytest.approx(100 * sum(r["score"] for r in rows) / 2)
    assert metrics["policy_stats"]["calls"] > 0 and metrics["timing"]["new_tokens"] == sum(r["new_tokens"] for r in rows)
    assert set(metrics["by_depth"]) == {"0.0", "1.0"}


def test_dense_patched_gives_the_unpatched_predictions(passkey_run):
    _, results = passkey_run
    rows = {}
    for r in results:
        with open(f"{r['folder']}/predictions.jsonl") as f:
            rows[r["policy_label"]] = [json.loads(line)["prediction"] for line in f]
    assert rows["dense"] == rows["none"] and all(rows["dense"])


def test_existing_folders_are_skipped_and_summarized(passkey_run, smol, caplog):
    out, first = passkey_run
    stamp = {r["folder"]: (r["folder"] + "/metrics.json", open(r["folder"] + "/metrics.json").read()) for r in first}
    with caplog.at_level("INFO", logger="tokaccel.evals.runner"):
        again = run_eval(smol, policies=["dense", "none"], tasks=["passkey"], lengths=[256], samples=2, out=out, progress=False)
    assert all(r["skipped"] for r in again) and [r["folder"] for r in again] == [r["folder"] for r in first]
    assert all(open(path).read() == text for path, text in stamp.values())
    assert "exists, skipped" in caplog.text
    table = (out / "summary.md").read_text()
    assert table == length_tables(collect_results(out))
    assert "**smollm2-135m-instruct, dense, float32** (score, samples)" in table
    assert "**smollm2-135m-instruct, none, float32** (score, samples, difference to dense)" in table
    listing = summary_table(again).splitlines()
    assert listing[0] == "| model | task | length | dense | none |"
    assert listing[2].startswith("| smollm2-135m-instruct | passkey | 256 | ")
    # other settings -> another folder, never a stale one
    settings = {"samples": 2, "seed": 0}
    task, method = get_task("passkey"), PolicyMethod("dense")
    base = result_dir(out, "m", task, 256, method, settings)
    assert base == result_dir(out, "m", task, 256, PolicyMethod("dense"), dict(settings))
    assert base != result_dir(out, "m", task, 256, method, {**settings, "samples": 3})
    assert base != result_dir(out, "m", task, 256, PolicyMethod("dense:backend=sdpa"), settings)
    assert base.parent == out / "m" / "passkey" / "256" and base.name.startswith("dense-")


def test_prefilled_context_is_reused_with_identical_answers(smol):
    model, tok = smol
    sample = make_samples("niah_multiquery_sep:max_new_tokens=6", tok, 256, 1, seed=7)[0]
    method = make_method("none")
    stop = eos_ids(model, tok)
    shared = answer_questions(model, tok, sample, method, 2048, stop, reuse_context=True)
    separate = answer_questions(model, tok, sample, method, 2048, stop, reuse_context=False)
    assert [o["ids"] for o in shared] == [o["ids"] for o in separate]
    assert len(shared) == 4 and shared[1]["prefill_s"] == 0.0  # one prefill for four questions


def test_greedy_equals_generate(smol):
    model, tok = smol
    ids = make_samples("passkey", tok, 200, 1, seed=1)[0].prompt_ids()
    cache, _ = prefill(model, ids[:-1], chunk=64)
    mine = greedy(model, cache, ids[-1:], len(ids) - 1, 8, eos_ids(model, tok))
    import torch

    reference = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert mine == reference[: len(mine)] and (len(mine) == 8 or mine[-1] in eos_ids(model, tok))


def test_specs_labels_and_errors(smol):
    assert split_specs("dense,tokenselect:k=1024,theta=0.9;h2o:budget=512") == ["dense", "tokenselect:k=1024,theta=0.9", "h2o:budget=512"]
    assert split_specs("kvpress:snapkv@0.5,window_size=32, dense") == ["kvpress:snapkv@0.5,window_size=32", "dense"]
    assert policy_label("dense:backend=sdpa", None) == "dense:backend=sdpa"
    assert policy_label(tokaccel.make_policy("dense", backend="sdpa"), tokaccel.make_policy("dense", backend="sdpa")) == "dense:backend=sdpa"
    with pytest.raises(ValueError, match="unknown policy"):
        run_eval(smol, policies=["nosuchpolicy"], tasks=["passkey"], lengths=[256], samples=1, out="/nonexistent")
    with pytest.raises(ValueError, match="unknown task"):
        run_eval(smol, policies=["dense"], tasks=["nosuchtask"], lengths=[256], samples=1, out="/nonexistent")
    model, _ = smol
    with tokaccel.patched(model, "dense"), pytest.raises(ValueError, match="unpatched model"):
        run_eval(smol, policies=["dense"], tasks=["passkey"], lengths=[256], samples=1, out="/nonexistent")


def test_kvpress_peer_without_kvpress():
    from tokaccel.evals import peers

    assert peers.parse_kvpress_spec("kvpress:snapkv@0.5,window_size=32") == ("snapkv", 0.5, {"window_size": 32})
    if peers.kvpress_available():
        pytest.skip("kvpress is installed: see test_kvpress_peer_runs")
    with pytest.raises(ImportError, match="pip install kvpress"):
        make_method("kvpress:snapkv@0.5")


def test_kvpress_adapter_wraps_only_the_prefill(smol, tmp_path, monkeypatch):
    """A stand-in kvpress module (identity press) checks how the adapter drives a press."""
    import contextlib
    import dataclasses
    import sys
    import types

    entered, seen = [], []

    def record(module, args, kwargs, output):  # what kvpress 0.5's hooks read from the attention call
        seen.append((kwargs["past_key_values"] is kwargs["cache"], kwargs["cache_position"].tolist()))

    @dataclasses.dataclass
    class KnormPress:
        compression_ratio: float = 0.0

        def __call__(self, model):
            @contextlib.contextmanager
            def applied():
                entered.append((self.compression_ratio, model.config._attn_implementation))
                handle = model.model.layers[0].self_attn.register_forward_hook(record, with_kwargs=True)
                yield
                handle.remove()

            return applied()

    class ObservedAttentionPress(KnormPress):
        pass

    fake = types.ModuleType("kvpress")
    fake.KnormPress, fake.ObservedAttentionPress = KnormPress, ObservedAttentionPress
    monkeypatch.setitem(sys.modules, "kvpress", fake)
    with pytest.raises(ValueError, match="unknown kvpress press 'snap'; available: knorm"):
        make_method("kvpress:snap@0.5")
    results = run_eval(smol, policies=["none", "kvpress:knorm_press@0.25"], tasks=["niah_multiquery_sep:max_new_tokens=4"], lengths=[256],
                       samples=1, out=tmp_path, progress=False)
    assert entered == [(0.25, "sdpa")]  # one prefill of the shared context, no press while decoding the 4 questions
    context = list(range(len(seen[0][1])))
    assert seen == [(True, context)] and len(context) > 200  # kvpress's names added for transformers >= 5.3
    press = results[1]
    assert press["policy"] == "kvpress" and press["policy_label"] == "kvpress:knorm_press@0.25"
    assert press["config"]["policy_config"] == {"press": "KnormPress", "compression_ratio": 0.25}
    assert press["score"] == results[0]["score"]  # an identity press changes nothing
    model, _ = smol
    run_eval(smol, policies=["kvpress:observed_attention@0.5"], tasks=["passkey"], lengths=[256], samples=1,
             out=tmp_path, progress=False)
    assert entered[-1] == (0.5, "eager") and model.config._attn_implementation == "sdpa"  # restored after


def test_kvpress_peer_runs(smol, tmp_path):
    pytest.importorskip("kvpress")
    results = run_eval(smol, policies=["kvpress:knorm@0.25"], tasks=["passkey"], lengths=[256], samples=1, out=tmp_path, progress=False)
    assert results[0]["policy"] == "kvpress" and results[0]["config"]["policy_config"]["press"] == "KnormPress"


def test_cli_prints_the_table_from_existing_results(passkey_run, capsys, monkeypatch):
    from tokaccel import cli

    out, _ = passkey_run

    def no_loading(*args, **kwargs):
        raise AssertionError("results exist: the model must not be loaded")

    monkeypatch.setattr("tokaccel.models.load", no_loading)
    code = cli.main(["eval", "--policies", "dense,none", "--tasks", "passkey", "--lengths", "256", "--samples", "2",
                     "--dtype", "float32", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "| smollm2-135m-instruct | passkey | 256 |" in printed
    assert cli.main(["eval", "--list-tasks"]) == 0 and "niah_multiquery_sep" in capsys.readouterr().out
    assert cli.main(["eval", "--policies", "nosuch", "--out", str(out), "--no-progress"]) == 2


def test_plots(passkey_run, tmp_path):
    pytest.importorskip("matplotlib")
    from tokaccel.evals.plots import plot_results

    out, _ = passkey_run
    written = plot_results(out, out_dir=tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["smollm2-135m-instruct_accuracy_vs_length.png", "smollm2-135m-instruct_depth_heatmap_dense.png",
                     "smollm2-135m-instruct_depth_heatmap_none.png"]
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)
    assert plot_results(tmp_path / "empty") == []


def test_report_tables_keep_dtypes_apart(passkey_run, tmp_path, capsys):
    import shutil

    from tokaccel import cli

    out, results = passkey_run
    dense = next(r for r in results if r["policy_label"] == "dense")
    shutil.copytree(dense["folder"], tmp_path / "a" / "dense-fp32")
    copy = tmp_path / "a" / "dense-bf16"
    shutil.copytree(dense["folder"], copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "length": 512}))
    found = collect_results(tmp_path)
    assert sorted(r["policy_label"] for r in found) == ["dense (bfloat16)", "dense (float32)"]
    tables = length_tables(found)
    score = f"{dense['score']:.1f} (2)"
    assert "**smollm2-135m-instruct, dense (float32), float32**" in tables
    assert f"| task | 256 |\n|---|---:|\n| passkey | {score} |" in tables
    assert f"| task | 512 |\n|---|---:|\n| passkey | {score} |" in tables
    assert cli.main(["eval", "--report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "**smollm2-135m-instruct, none, float32**" in printed and "| passkey |" in printed
    assert cli.main(["eval", "--report", str(tmp_path / "nothing")]) == 2


def test_report_tables_show_difference_to_dense_and_hit_rate():
    from tokaccel.evals.runner import length_tables

    def result(policy, task, length, score, hit_rate=None):
        metrics = {} if hit_rate is None else {"selection_hit_rate": hit_rate}
        return {"model": "m", "task": task, "length": length, "policy": policy, "policy_label": policy,
                "metric": "string_match_all", "score": score, "n_samples": 20,
                "config": {"dtype": "bfloat16"}, "metrics": metrics}

    results = [result("dense", "passkey", 4096, 90.0), result("dense", "niah", 4096, 80.0),
               result("tokenselect", "passkey", 4096, 85.0, 0.5), result("tokenselect", "niah", 4096, 80.0, 0.7),
               result("tokenselect", "passkey", 8192, 40.0, 0.9)]
    tables = length_tables(results)
    assert "**m, dense, bfloat16** (score, samples)\n" in tables
    assert "| passkey | 90.0 (20) |" in tables  # dense cells carry no difference
    assert "**m, tokenselect, bfloat16** (score, samples, difference to dense)" in tables
    assert "| passkey | 85.0 (20) -5.0 | 40.0 (20) |" in tables  # no dense at 8K: no difference
    assert "| niah | 80.0 (20) +0.0 | - |" in tables
    assert "| selection-cache hit rate | 0.60 | 0.90 |" in tables


def test_fasa_results_record_which_calibration_they_used(smol, tmp_path, monkeypatch):
    """A FASA cell's config.json names its calibration (source, settings, content digest): two
    calibrations of one model give the same policy_config but different provenance."""
    from tokaccel.calibrate import save_calibration
    from tokaccel.policies import FASA

    monkeypatch.setenv("TOKACCEL_CACHE", str(tmp_path / "cache"))
    cal = {"format": "tokaccel-fasa-calibration/1", "model": "smollm2-135m-instruct", "pairing": "hf",
           "num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "n_fc": 8, "top_k": 128, "samples": 4,
           "length": 4096, "queries_per_sample": 32, "dominant_fcs": [[list(range(8))] * 3] * 30}
    path = save_calibration(cal)
    configs = []
    for source, spec in ((None, "fasa:k=64"), ("dict", FASA(k=64, calibration={**cal, "samples": 2}))):
        result = run_eval(smol, policies=[spec], tasks=["passkey"], lengths=[256], samples=1,
                          out=tmp_path / str(source), progress=False)[0]
        configs.append(result["config"])
    default, given = (c["policy_provenance"]["calibration"] for c in configs)
    assert default["source"] == str(path) and default["samples"] == 4 and default["length"] == 4096
    assert given["source"] == "dict" and given["samples"] == 2
    assert len(default["sha256"]) == 16 and default["sha256"] != given["sha256"]
    assert configs[0]["policy_config"]["calibration"] is None and "policy_provenance" not in \
        run_eval(smol, policies=["dense"], tasks=["passkey"], lengths=[256], samples=1, out=tmp_path / "d",
                 progress=False)[0]["config"]
    rerun = dict(policies=["fasa:k=64"], tasks=["passkey"], lengths=[256], samples=1, out=tmp_path / "None", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same file: reused quietly
        assert run_eval(smol, **rerun)[0]["skipped"]
    save_calibration({**cal, "selection": "combined"})  # recalibrated: the folder's hash does not see it
    with pytest.warns(RuntimeWarning, match="computed with another calibration .* pass --force"):
        assert run_eval(smol, **rerun)[0]["skipped"]
