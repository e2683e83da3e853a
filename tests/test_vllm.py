"""tokaccel inside a real vLLM engine (skipped where vLLM is not installed: scripts/setup_vllm.sh).

SmolLM2-135M-Instruct exported to a local folder (TOKACCEL_VLLM_MODEL, default
$TOKACCEL_CACHE/vllm/smollm2-135m-instruct, written by scripts/setup_vllm.sh), greedy, 8 prompts of 9-504
tokens in one batch, cache blocks of 32. With a budget covering every context and the sparse path
forced (dense_fallback=false: every decode step of every request goes through tokaccel), the
tokens equal vLLM's own backend's, for TokenSelect (token rows read from the paged cache) and
Quest on whole blocks (vLLM's kernel over the chosen blocks); a small budget changes them (so the
path did run). At most 3 requests run at a time, so requests join and leave the batch, and a
budget between the prompts' lengths mixes dense and sparse requests in the same steps. The
`generate` entry point of tokaccel.vllm.run (what `tokaccel eval --engine vllm`
starts) answers JSONL token-id requests (one engine start, about 40 s on 2 cores)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokaccel.models import cache_dir

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

MODEL = Path(os.environ.get("TOKACCEL_VLLM_MODEL") or cache_dir() / "vllm" / "smollm2-135m-instruct")
LENGTHS = (5, 40, 120, 300, 77, 500, 13, 220)
WORDS = "The quick brown fox jumps over the lazy dog near the river bank while children play .".split()


def _prompts() -> list[str]:
    return [f"Story {i}: " + " ".join(WORDS[(j * 7 + i) % len(WORDS)] for j in range(n))
            for i, n in enumerate(LENGTHS)]


def _generate(tmp_path: Path, policy: str | None, tokens: int = 12, model: Path = MODEL, ranks: int = 1,
              prompts: list | None = None, at_once: int = 3) -> list[list[int]]:
    """Greedy tokens of the 8 prompts (or `prompts`), at most `at_once` requests at a time: requests
    join and leave the running batch as others finish (continuous batching). ranks: tensor-parallel
    worker processes."""
    prompts = _prompts() if prompts is None else prompts
    key = abs(hash((policy, str(model), ranks, json.dumps(prompts), at_once)))
    prompts_file, out = tmp_path / f"prompts-{key}.json", tmp_path / f"out-{key}.json"
    prompts_file.write_text(json.dumps(prompts))
    args = [sys.executable, "-m", "tokaccel.vllm.run", "--model", str(model), "--prompts", str(prompts_file),
            "--max-tokens", str(tokens), "--max-model-len", "1024", "--block-size", "32", "--max-num-seqs",
            str(at_once), "--tensor-parallel-size", str(ranks), "--out", str(out)]
    if policy:
        args += ["--policy", policy]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("TOKACCEL_VLLM_POLICY", None)
    if ranks > 1:  # vLLM binds each CPU rank to a NUMA node unless told which cores (one node here)
        cores = sorted(os.sched_getaffinity(0))
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(cores[r % len(cores)]) for r in range(ranks))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())["outputs"]


def test_the_kv_layout_is_the_one_tokaccel_reads():
    """vLLM's own cache writer puts keys where tokaccel.vllm.paged reads them."""
    from vllm import _custom_ops as ops

    from tokaccel.vllm.paged import key_rows, rows_at, split_kv_cache

    Hk, bs, D, n = 3, 32, 64, 70
    for isa in ("vec", "vec16"):
        kv_cache = torch.zeros(5, Hk, bs, 2 * D)
        key_cache, value_cache = split_kv_cache(kv_cache)
        parent = kv_cache.view(5, Hk, 2 * bs, D).chunk(2, dim=2)
        keys, values = torch.randn(n, Hk, D), torch.randn(n, Hk, D)
        blocks = torch.tensor([3, 0, 4])
        slots = blocks[torch.arange(n) // bs] * bs + torch.arange(n) % bs
        ops.cpu_attn_reshape_and_cache(keys, values, *parent, slots, isa, k_scale=1.0, v_scale=1.0,
                                       kv_cache_dtype="auto")
        assert torch.equal(key_rows(key_cache, blocks, n)[0], keys.transpose(0, 1))
        k, v = rows_at(key_cache, value_cache, blocks, torch.tensor([0, 33, 69]))
        assert torch.equal(k[0], keys[[0, 33, 69]].transpose(0, 1)) and torch.equal(v[0], values[[0, 33, 69]].transpose(0, 1))


def test_cuda_graphs_are_declined_only_with_a_policy(monkeypatch):
    """The CUDA builder (Triton's subclass) asks vLLM to keep attention out of captured graphs when
    a policy selects per step, and keeps Triton's support level otherwise."""
    from types import SimpleNamespace

    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadataBuilder

    from tokaccel.vllm.backend import TokaccelCUDAMetadataBuilder

    monkeypatch.delenv("TOKACCEL_VLLM_POLICY", raising=False)
    sparse = SimpleNamespace(additional_config={"tokaccel_policy": "quest:k=256,page=32"})
    plain = SimpleNamespace(additional_config={})
    assert TokaccelCUDAMetadataBuilder.get_cudagraph_support(sparse, None) == AttentionCGSupport.NEVER
    assert TokaccelCUDAMetadataBuilder.get_cudagraph_support(plain, None) == \
        TritonAttentionMetadataBuilder.get_cudagraph_support(plain, None) != AttentionCGSupport.NEVER


@pytest.mark.skipif(not (MODEL / "config.json").exists(), reason=f"no exported model in {MODEL}")
def test_greedy_tokens_equal_vllms_own_with_a_covering_budget(tmp_path):
    own = _generate(tmp_path, None)
    covering = _generate(tmp_path, "tokenselect:k=1024,n_init=4,n_local=16,dense_fallback=false")
    assert covering == own
    quest = _generate(tmp_path, "quest:k=1024,page=32,n_init=4,n_local=16,dense_fallback=false")  # whole blocks
    assert quest == own
    small = _generate(tmp_path, "tokenselect:k=8,n_init=4,n_local=8,dense_fallback=false")
    assert small != own  # 20 tokens read per step: the tokaccel path did run
    assert [len(o) for o in small] == [12] * len(LENGTHS)
    # Budget 84 with the dense fallback: requests of up to 56 tokens stay on vLLM's kernel while
    # longer ones in the same steps decode sparsely (the 77-word one crosses over mid-generation);
    # the dense ones, served from the split-off metadata, must be exactly vLLM's.
    mixed = _generate(tmp_path, "tokenselect:k=64,n_init=4,n_local=16")
    short = [i for i, n in enumerate(LENGTHS) if n <= 40]
    assert [mixed[i] for i in short] == [own[i] for i in short]
    assert [len(o) for o in mixed] == [12] * len(LENGTHS)


@pytest.mark.skipif(not (MODEL / "config.json").exists(), reason=f"no exported model in {MODEL}")
def test_the_generate_entry_point_answers_token_id_requests(tmp_path):
    """`python -m tokaccel.vllm.run generate` (what `tokaccel eval --engine vllm` runs): JSONL in,
    greedy token ids out per request id, EOS / stop ids honoured, versions in the meta file."""
    from transformers import AutoTokenizer

    from tokaccel.vllm.run import read_jsonl, write_jsonl

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Count from one to ten in words."}],
                                         add_generation_prompt=True, tokenize=False)
    prompt = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    write_jsonl(tmp_path / "in.jsonl", [{"id": "long", "prompt_token_ids": prompt, "max_tokens": 8, "stop_token_ids": [2]},
                                        {"id": "short", "prompt_token_ids": prompt, "max_tokens": 3, "stop_token_ids": []}])
    args = [sys.executable, "-m", "tokaccel.vllm.run", "generate", "--model", str(MODEL), "--input",
            str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--meta", str(tmp_path / "meta.json")]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("TOKACCEL_VLLM_POLICY", None)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = {row["id"]: row for row in read_jsonl(tmp_path / "out.jsonl")}
    assert sorted(out) == ["long", "short"] and len(out["short"]["token_ids"]) == 3
    assert 3 <= len(out["long"]["token_ids"]) <= 8 and out["long"]["token_ids"][:3] == out["short"]["token_ids"]
    assert out["long"]["decode_s"] is not None and out["long"]["prefill_s"] is not None
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["versions"]["vllm"] and meta["block_size"] == 32 and meta["max_model_len"] % 32 == 0
    assert meta["max_model_len"] >= len(prompt) + 8


def _tiny_llama(folder: Path) -> Path:
    """A random-weight 2-layer Llama with 4 query and 2 KV heads (SmolLM2's 9 / 3 do not split over
    2 ranks), saved with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, initializer_range=0.1)  # 0.02: attention barely moves the logits
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(MODEL).save_pretrained(folder)
    return folder


@pytest.mark.skipif(not (MODEL / "config.json").exists(), reason=f"no exported model in {MODEL}")
def test_two_tensor_parallel_ranks_each_select_over_their_own_heads(tmp_path):
    """Two ranks, each holding one of the two KV heads' cache and its own per-request states: at a
    covering budget with the sparse path forced the tokens equal vLLM's own with two ranks; a
    small budget changes them (so both ranks' selection ran)."""
    model = _tiny_llama(tmp_path / "tiny-llama")
    own = _generate(tmp_path, None, model=model, ranks=2)
    covering = _generate(tmp_path, "quest:k=1024,page=32,n_init=4,n_local=32,dense_layers=0,dense_fallback=false",
                         model=model, ranks=2)
    small = _generate(tmp_path, "quest:k=32,page=32,n_init=4,n_local=32,dense_layers=0,dense_fallback=false",
                      model=model, ranks=2)
    assert covering == own
    assert small != own


def _served(tmp_path: Path, policy: str, prompts: list[str], tokens: int = 12) -> list[list[int]]:
    """Greedy token ids from vLLM's OpenAI server started as the README says (`./run.sh vllm-serve`,
    vLLM's `vllm serve` module: vllm-cpu's `vllm` script cannot start) with the policy in
    --additional-config, one request at a time."""
    import socket
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [str(Path(__file__).resolve().parents[1] / "run.sh"), "vllm-serve", "--host", "127.0.0.1", "--port",
            str(port), "--enforce-eager", "--max-model-len", "1024", "--additional-config",
            json.dumps({"tokaccel_policy": policy})]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKACCEL_VLLM_VENV": sys.prefix, "TOKACCEL_VLLM_MODEL": str(MODEL)}
    env.pop("TOKACCEL_VLLM_POLICY", None)
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(2)
        outputs = []
        for prompt in prompts:
            body = {"model": str(MODEL), "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True}
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=300) as response:
                outputs.append(json.loads(response.read())["choices"][0]["token_ids"])
        return outputs
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.skipif(not (MODEL / "config.json").exists(), reason=f"no exported model in {MODEL}")
def test_the_openai_server_decodes_with_the_policy_of_its_additional_config(tmp_path):
    """`--additional-config '{"tokaccel_policy": ...}'` reaches the backend of vLLM's OpenAI server:
    its greedy tokens equal the offline engine's with that policy (one request at a time in both)
    and differ from vLLM's own attention."""
    prompts = [_prompts()[i] for i in (3, 5)]  # 300 and 500 words
    policy = "quest:k=32,page=32,n_init=4,n_local=32,dense_layers=0,dense_fallback=false"
    served = _served(tmp_path, policy, prompts)
    assert served == _generate(tmp_path, policy, prompts=prompts, at_once=1)
    assert served != _generate(tmp_path, None, prompts=prompts, at_once=1)
