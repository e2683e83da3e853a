"""`tokaccel eval --engine vllm` without vLLM: the checks made before any engine starts, and the
sample -> JSONL -> result round trip with a fake engine in place of the vLLM environment's process
(the real one: tests/test_vllm.py)."""

import json
import re

import pytest

from tokaccel.cli import build_parser
from tokaccel.cli import main as cli_main
from tokaccel.evals import make_samples, run_eval
from tokaccel.evals import vllm_engine
from tokaccel.evals.runner import collect_results, length_tables, make_method, result_dir
from tokaccel.evals.tasks import get_task
from tokaccel.vllm import run as vllm_run


@pytest.fixture
def vllm_env(tmp_path, monkeypatch):
    """A vLLM environment and an exported model folder that exist (nothing runs them)."""
    venv, model = tmp_path / "venv", tmp_path / "smollm2-export"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 3\n")
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    monkeypatch.setenv("TOKACCEL_VLLM_VENV", str(venv))
    monkeypatch.setenv("TOKACCEL_VLLM_MODEL", str(model))
    monkeypatch.setenv("TOKACCEL_VLLM_POLICY", "tokenselect:k=8")  # must not reach the engine
    return venv, model


class FakeEngine:
    """Stands in for `python -m tokaccel.vllm.run generate`: answers each request with the pass key
    found in its prompt (vLLM's own attention) or with a wrong one (a policy), and records calls."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, cmd, env, log_path):
        arg = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
        self.calls.append({"cmd": cmd, "env": env, "arg": arg})
        log_path.write_text("fake vLLM log\n")
        assert cmd[1:4] == ["-m", "tokaccel.vllm.run", "generate"]
        outputs = []
        for request in vllm_run.read_jsonl(arg["--input"]):
            prompt = self.tokenizer.decode(request["prompt_token_ids"])
            key = re.search(r"pass key is (\d+)", prompt).group(1)
            answer = key if "--policy" not in arg else "12345"
            ids = self.tokenizer(f" {answer}.", add_special_tokens=False)["input_ids"] + request["stop_token_ids"][:1]
            outputs.append({"id": request["id"], "token_ids": ids[: request["max_tokens"]], "prefill_s": 0.5,
                            "decode_s": 0.25})
        vllm_run.write_jsonl(arg["--output"], outputs)
        meta = {"versions": {"vllm": "0.32.0", "torch": "2.13.0+cpu", "transformers": "5.19.0"},
                "block_size": int(arg["--block-size"]), "max_model_len": 512, "engine_start_s": 1.0,
                "generate_s": 2.0}
        with open(arg["--meta"], "w") as f:
            json.dump(meta, f)
        return 0


def test_the_engine_option_parses_and_defaults_to_hf():
    parser = build_parser()
    assert parser.parse_args(["eval"]).engine == "hf"
    assert parser.parse_args(["eval", "--engine", "vllm"]).engine == "vllm"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--engine", "sglang"])
    with pytest.raises(ValueError, match="engine"):
        run_eval("smollm2", engine="sglang", progress=False)


@pytest.mark.parametrize("policy", ["hisa:k=256", "none", "kvpress:snapkv@0.5", "h2o:budget=0.5"])
def test_a_policy_vllm_cannot_run_is_refused_before_anything_starts(policy, vllm_env, capsys, monkeypatch):
    monkeypatch.setattr(vllm_run, "launch", lambda *a: pytest.fail("no engine may start"))
    assert cli_main(["eval", "--engine", "vllm", "--policies", f"dense;{policy}", "--tasks", "passkey"]) == 2
    err = capsys.readouterr().err
    assert "does not run in vLLM" in err and "tokenselect" in err and "quest" in err


def test_bad_options_and_position_modes_are_refused(vllm_env):
    with pytest.raises(ValueError, match="unknown option"):
        vllm_engine.check("smollm2", ["quest:bogus=1"], ["passkey"])
    with pytest.raises(ValueError, match="position_mode=original"):
        vllm_engine.check("smollm2", ["tokenselect:position_mode=compact"], ["passkey"])
    with pytest.raises(ValueError, match="perplexity"):
        vllm_engine.check("smollm2", ["dense"], ["ppl"])
    with pytest.raises(ValueError, match="CPU"):
        vllm_engine.check("smollm2", ["dense"], ["passkey"], device="cuda")
    with pytest.raises(ValueError, match="repeat"):
        vllm_engine.check("smollm2", ["dense", "dense"], ["passkey"])


def test_only_smollm2_or_a_local_folder(vllm_env, tmp_path, capsys):
    assert cli_main(["eval", "--engine", "vllm", "--model", "gemma3-270m", "--tasks", "passkey"]) == 2
    assert "smollm2-135m-instruct" in capsys.readouterr().err
    with pytest.raises(ValueError, match="local model folder"):
        vllm_run.vllm_model_dir("HuggingFaceTB/SmolLM2-360M-Instruct")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        vllm_run.vllm_model_dir(tmp_path / "empty")
    _, model = vllm_env
    assert vllm_run.vllm_model_dir("smollm2") == model and vllm_run.vllm_model_dir(str(model)) == model


def test_a_missing_vllm_environment_or_export_says_how_to_make_it(vllm_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOKACCEL_VLLM_VENV", str(tmp_path / "nowhere"))
    assert cli_main(["eval", "--engine", "vllm", "--tasks", "passkey"]) == 2
    err = capsys.readouterr().err
    assert "no vLLM environment" in err and "./run.sh vllm-setup" in err
    monkeypatch.setenv("TOKACCEL_VLLM_MODEL", str(tmp_path / "no-export"))
    assert cli_main(["eval", "--engine", "vllm", "--tasks", "passkey"]) == 2
    assert "./run.sh vllm-setup" in capsys.readouterr().err


def test_round_trip_through_a_fake_engine(vllm_env, smol_tok, tmp_path, monkeypatch):
    fake = FakeEngine(smol_tok)
    monkeypatch.setattr(vllm_run, "launch", fake)
    out = tmp_path / "results"
    results = run_eval("smollm2", policies=["dense", "quest:k=64,page=32,n_init=4,n_local=16"], tasks=["passkey"],
                       lengths=[256, 320], samples=2, out=out, engine="vllm", progress=False)
    # one engine per policy, all lengths in it; the policy only through --policy, never the environment
    assert len(fake.calls) == 2 and "--policy" not in fake.calls[0]["arg"]
    assert fake.calls[1]["arg"]["--policy"] == "quest:k=64,page=32,n_init=4,n_local=16"
    assert all("TOKACCEL_VLLM_POLICY" not in c["env"] and c["env"]["VLLM_CPU_KVCACHE_SPACE"] for c in fake.calls)
    assert fake.calls[0]["cmd"][0] == str(vllm_env[0] / "bin" / "python")
    assert [(r["length"], r["policy_label"], r["score"], r["skipped"]) for r in results] == [
        (256, "dense (vllm)", 100.0, False), (256, "quest:k=64,n_init=4,n_local=16,page=32 (vllm)", 0.0, False),
        (320, "dense (vllm)", 100.0, False), (320, "quest:k=64,n_init=4,n_local=16,page=32 (vllm)", 0.0, False)]
    first = results[0]
    config, folder = first["config"], first["folder"]
    assert config["engine"] == "vllm" and config["vllm_version"] == "0.32.0" and config["policy"] == "dense"
    assert config["vllm_versions"]["transformers"] == "5.19.0" and config["vllm_block_size"] == 32
    assert config["prefill_chunk"] is None and config["reuse_context"] is False and config["dtype"] == "float32"
    assert "git_commit" in config and config["versions"]["transformers"]
    assert folder.split("/")[-1].startswith("vllm-dense-")
    rows = [json.loads(line) for line in open(f"{folder}/predictions.jsonl")]
    samples = make_samples("passkey", smol_tok, 256, 2)
    assert [r["answers"] for r in rows] == [s.questions[0].answers for s in samples]
    assert all(r["prediction"].strip() == f"{r['answers'][0]}." and r["score"] == 1.0 for r in rows)
    assert rows[0]["token_ids"][-1] == 2 and rows[0]["prompt_tokens"] == 256
    metrics = json.loads(open(f"{folder}/metrics.json").read())
    assert metrics["n_samples"] == 2 and metrics["timing"]["batched"] and metrics["timing"]["prefill_s_mean"] == 0.5
    # a second run reads the folders, starts no engine
    again = vllm_engine.run_eval_vllm("smollm2", policies=["dense", "quest:k=64,page=32,n_init=4,n_local=16"],
                                      tasks=["passkey"], lengths=[256, 320], samples=2, out=out, progress=False,
                                      tokenizer=smol_tok)
    assert len(fake.calls) == 2 and all(r["skipped"] for r in again)
    assert [r["folder"] for r in again] == [r["folder"] for r in results]
    assert "dense (vllm)" in (out / "summary.md").read_text()


def test_the_requests_are_the_hf_prompts(vllm_env, smol_tok, tmp_path, monkeypatch):
    seen = []
    fake = FakeEngine(smol_tok)

    def spy(cmd, env, log_path):
        seen.extend(vllm_run.read_jsonl(cmd[cmd.index("--input") + 1]))
        return fake(cmd, env, log_path)

    monkeypatch.setattr(vllm_run, "launch", spy)
    vllm_engine.run_eval_vllm("smollm2", policies=["dense"], tasks=["passkey"], lengths=[300], samples=3, seed=7,
                              out=tmp_path, progress=False, tokenizer=smol_tok)
    expected = make_samples("passkey", smol_tok, 300, 3, seed=7)
    assert [r["prompt_token_ids"] for r in seen] == [s.prompt_ids() for s in expected]
    assert all(r["max_tokens"] == expected[0].max_new_tokens and r["stop_token_ids"] == [2] for r in seen)


def test_vllm_and_hf_results_never_mix(vllm_env, smol_tok, tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_run, "launch", FakeEngine(smol_tok))
    task = get_task("passkey")
    settings = {"task": "passkey", "params": task.params, "metric": task.metric, "max_new_tokens": task.max_new_tokens,
                "samples": 2, "seed": 0, "chat": None, "dtype": "float32", "prefill_chunk": 2048}
    hf_dense = result_dir(tmp_path, "smollm2-135m-instruct", task, 256, make_method("dense"), settings)
    (vllm_result,) = vllm_engine.run_eval_vllm("smollm2", policies=["dense"], tasks=["passkey"], lengths=[256],
                                               samples=2, out=tmp_path, progress=False, tokenizer=smol_tok)
    assert hf_dense.parent == vllm_engine.Path(vllm_result["folder"]).parent
    assert hf_dense.name.split("-")[-1] != vllm_result["folder"].split("-")[-1]  # the hash differs
    # an HF dense result in the same folder stays a separate column, and vLLM's cells compare to vLLM's dense
    hf_dense.mkdir(parents=True)
    config = {k: v for k, v in vllm_result["config"].items() if k != "engine"}
    config.update(policy_label="dense", policy_kind="tokaccel")
    (hf_dense / "config.json").write_text(json.dumps(config))
    metrics = dict(vllm_result["metrics"], score=50.0)
    (hf_dense / "metrics.json").write_text(json.dumps(metrics))
    collected = collect_results(tmp_path)
    assert sorted((r["policy_label"], r["score"]) for r in collected) == [("dense", 50.0), ("dense (vllm)", 100.0)]
    tables = length_tables(collected)
    assert "**smollm2-135m-instruct, dense, float32**" in tables and "dense (vllm)" in tables


def test_requests_longer_than_the_model_are_refused_before_the_engine_starts(vllm_env, monkeypatch):
    _, model = vllm_env
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    monkeypatch.setattr(vllm_run, "launch", lambda *a: pytest.fail("the engine must not start"))
    request = {"id": "a", "prompt_token_ids": list(range(60)), "max_tokens": 8, "stop_token_ids": []}
    with pytest.raises(ValueError, match=r"positions \(longest prompt \+ new tokens\)=96 .*\[1, 64\]"):
        vllm_run.generate_via_vllm([request], model, None, block_size=32)  # 68 tokens, in blocks of 32
