"""`tokaccel bench vllm` without vLLM: option parsing and checks, and the whole run with a fake engine
process in place of `python -m tokaccel.bench.vllm JOB OUT` (the real one needs ./run.sh vllm-setup)."""

import json
import re

import pytest

from tokaccel.bench import cli
from tokaccel.bench import vllm as bench_vllm
from tokaccel.bench.results import METADATA_COLUMNS, read_rows
from tokaccel.vllm import run as vllm_run


@pytest.fixture(scope="module")
def smol_tok():
    from tokaccel.evals.vllm_engine import load_tokenizer

    try:
        return load_tokenizer("smollm2-135m-instruct")
    except ModuleNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture
def vllm_env(tmp_path, monkeypatch):
    venv, model = tmp_path / "venv", tmp_path / "export"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    monkeypatch.setenv("TOKACCEL_VLLM_VENV", str(venv))
    monkeypatch.setenv("TOKACCEL_VLLM_MODEL", str(model))
    return venv, model


def _parse(*argv):
    parser = cli.argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", "vllm", *argv])


def test_options_parse():
    args = _parse()
    assert (args.contexts, args.concurrency, args.policy, args.new_tokens, args.tasks, args.samples) == (
        [2048, 8000], [1, 4], None, 32, ["niah_single_2"], 3)
    args = _parse("--contexts", "1K,8000", "--concurrency", "1,4", "--policy", "quest:k=768,n_init=64,n_local=192,page=32",
                  "--new-tokens", "8", "--tasks", "passkey,niah_single", "--samples", "3", "--out", "x")
    assert args.contexts == [1024, 8000] and args.policy == ["quest:k=768,n_init=64,n_local=192,page=32"]
    assert args.tasks == ["passkey", "niah_single"] and args.new_tokens == 8 and args.samples == 3
    assert _parse("--policy", "tokenselect:k=512,quest:k=512,page=32").policy == ["tokenselect:k=512", "quest:k=512,page=32"]


@pytest.mark.parametrize("argv, message", [
    (["--policy", "hisa:k=256"], "does not run in vLLM"),
    (["--policy", "quest:nope=1"], "unknown option"),
    (["--contexts", "0"], "--contexts"),
    (["--new-tokens", "0"], "--new-tokens"),
    (["--tasks", "ppl"], "perplexity"),
    (["--model", "gemma3"], "smollm2-135m-instruct"),
])
def test_bad_options_fail_before_any_engine(argv, message, vllm_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(vllm_run, "launch", lambda *a: pytest.fail("no engine may start"))
    assert cli.main(["bench", "vllm", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_vllm_environment_says_how_to_make_it(vllm_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOKACCEL_VLLM_VENV", str(tmp_path / "nowhere"))
    assert cli.main(["bench", "vllm", "--out", str(tmp_path / "out")]) == 2
    assert "./run.sh vllm-setup" in capsys.readouterr().err


def test_random_prompts_have_the_exact_length_and_nest(smol_tok):
    four = bench_vllm.random_prompts(smol_tok, 300, 4, seed=1)
    assert [len(p) for p in four] == [300] * 4 and len({tuple(p) for p in four}) == 4
    assert bench_vllm.random_prompts(smol_tok, 300, 2, seed=1) == four[:2]


def test_a_run_with_a_fake_engine(vllm_env, smol_tok, tmp_path, monkeypatch, capsys):
    calls = []

    def fake(cmd, env, log_path):
        """vLLM's backend finds every pass key; tokaccel's finds none and decodes 1.5x faster."""
        assert cmd[1:3] == ["-m", "tokaccel.bench.vllm"] and "TOKACCEL_VLLM_POLICY" not in env
        job = json.loads(open(cmd[3]).read())
        calls.append(job)
        speed = 1.0 if job["policy"] is None else 1.5
        decode = [{"context": case["context"], "concurrency": c, "new_tokens": job["new_tokens"], "decode_s": 1.0,
                   "decode_tok_per_s": 10.0 * c * speed, "ms_per_token": 100.0 / speed, "prefill_s": 2.0}
                  for case in job["decode"] for c in job["concurrency"]]
        outputs = []
        for r in job["requests"]:
            key = re.search(r"pass key is (\d+)", smol_tok.decode(r["prompt_token_ids"])).group(1)
            answer = key if job["policy"] is None else "0"
            outputs.append({"id": r["id"], "token_ids": smol_tok(f" {answer}.", add_special_tokens=False)["input_ids"]})
        with open(cmd[4], "w") as f:
            json.dump({"decode": decode, "outputs": outputs, "versions": {"vllm": "0.32.0", "torch": "2.13.0+cpu"}}, f)
        return 0

    monkeypatch.setattr(vllm_run, "launch", fake)
    out = tmp_path / "bench"
    argv = ["bench", "vllm", "--contexts", "300,400", "--concurrency", "1,2", "--new-tokens", "4", "--tasks", "passkey", "--samples", "2",
            "--policy", "quest:k=64,page=32,n_init=4,n_local=16", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    assert [c["policy"] for c in calls] == [None, "quest:k=64,page=32,n_init=4,n_local=16"]
    job = calls[0]
    assert [len(case["prompts"]) for case in job["decode"]] == [2, 2] and job["max_model_len"] % 32 == 0
    assert [len(p) for p in job["decode"][1]["prompts"]] == [400, 400] and len(job["requests"]) == 4
    assert calls[1]["requests"] == job["requests"] and calls[1]["decode"] == job["decode"]  # the same prompts
    rows = read_rows(out / "bench_vllm.csv")
    assert set(METADATA_COLUMNS) <= set(rows[0]) and all(r["vllm"] == "0.32.0" for r in rows)
    decode = [r for r in rows if r["case"] == "decode"]
    assert sorted((r["backend"], r["context"], r["concurrency"]) for r in decode) == sorted(
        (b, n, c) for b in ("vllm", "quest:k=64,page=32,n_init=4,n_local=16") for n in ("300", "400") for c in ("1", "2"))
    assert {float(r["speedup_vs_vllm"]) for r in decode if r["backend"] != "vllm"} == {1.5}
    accuracy = {(r["backend"], r["context"]): (float(r["score"]), r["samples"]) for r in rows if r["case"] == "accuracy"}
    assert accuracy == {("vllm", "300"): (100.0, "2"), ("vllm", "400"): (100.0, "2"),
                        ("quest:k=64,page=32,n_init=4,n_local=16", "300"): (0.0, "2"),
                        ("quest:k=64,page=32,n_init=4,n_local=16", "400"): (0.0, "2")}
    markdown = (out / "bench_vllm.md").read_text()
    assert "`tokaccel bench vllm --model smollm2-135m-instruct --contexts 300,400" in markdown
    assert "| speed-up vs vLLM |" in capsys.readouterr().out


def test_the_old_script_is_a_wrapper(monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "vllm_decode.py"
    spec = importlib.util.spec_from_file_location("vllm_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen = []
    monkeypatch.setattr(module, "bench_main", lambda argv: seen.append(argv) or 0)
    assert module.main(["--contexts", "1024"]) == 0
    assert seen[0][:4] == ["bench", "vllm", "--contexts", "1024"] and seen[0][-1].endswith("results/vllm")
