"""Greedy generation through a vLLM engine, with or without a tokaccel policy, as commands that
write JSON (vLLM starts worker processes, so callers run them as their own process, in the vLLM
environment of scripts/setup_vllm.sh):

    python -m tokaccel.vllm.run --model DIR --prompts prompts.json --max-tokens 16 \\
        --out result.json [--policy "tokenselect:k=1024"] [--repeat-with-max-tokens 1] [--tensor-parallel-size 2]
    python -m tokaccel.vllm.run generate --model DIR --input requests.jsonl --output outputs.jsonl \\
        [--meta meta.json] [--policy "quest:k=768,page=32"] [--dtype float32] [--block-size 32]

The first form: prompts.json is a list of strings or of token-id lists; output {"outputs": [[token
ids]...], "seconds": generate() wall time, "seconds_short": the same prompts with
--repeat-with-max-tokens (decode time = seconds - seconds_short)}; every prompt runs to
--max-tokens (EOS ignored).

`generate` (what `tokaccel eval --engine vllm` runs): one request per input line, {"id",
"prompt_token_ids", "max_tokens", "stop_token_ids"}, greedy, stopping at EOS and the stop ids; one
output line per request, {"id", "token_ids", "prefill_s", "decode_s"} (times from vLLM's request
stats; requests run batched, so they overlap). --meta gets the vLLM / torch / transformers
versions, the engine's settings and the wall times.

Without --policy the engine runs vLLM's own attention (the plugin is switched off with
VLLM_PLUGINS=""). VLLM_CPU_KVCACHE_SPACE defaults to 2 (GiB).

The main environment's side (`run_in_vllm`, `generate_via_vllm`, `vllm_python`, `vllm_model_dir`,
`vllm_policy`) starts these commands with the vLLM environment's python; importing this module
never imports vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from ..validation import check_int

DEFAULT_BLOCK_SIZE = 32  # cache blocks of 32 tokens: quest:page=32 then selects whole blocks (the fast path)
EMBEDDED_MODEL = "smollm2-135m-instruct"  # the one embedded model scripts/setup_vllm.sh exports
SETUP_HINT = "run ./run.sh vllm-setup (scripts/setup_vllm.sh)"


# ---------------------------------------------------------------- the vLLM side


def engine(model: str, policy: str | None, max_model_len: int, max_num_seqs: int, block_size: int | None = None,
           prefix_caching: bool = False, dtype: str = "float32", log_stats: bool = False, tensor_parallel: int = 1):
    """A vLLM `LLM` on CPU, eager (float32 by default); tokaccel's policy through additional_config.
    log_stats: keep vLLM's per-request stats (RequestOutput.metrics: first / last token times);
    tensor_parallel: ranks (worker processes), each selecting over its own heads."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if policy is None:
        os.environ["VLLM_PLUGINS"] = ""  # vLLM's own backend, not tokaccel's subclass
    from vllm import LLM

    extra = {"tokaccel_policy": policy} if policy else {}
    return LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=max_model_len,
               max_num_seqs=max_num_seqs, seed=0, block_size=block_size, additional_config=extra,
               enable_prefix_caching=prefix_caching, disable_log_stats=not log_stats,
               tensor_parallel_size=tensor_parallel)


def generate(llm, prompts: list, max_tokens: int) -> tuple[list[list[int]], float]:
    """(greedy token ids per prompt, wall seconds); every prompt runs to max_tokens (EOS ignored)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts]
    start = time.perf_counter()
    results = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return [list(r.outputs[0].token_ids) for r in results], seconds


def generate_requests(llm, requests: list[dict]) -> tuple[list[dict], float]:
    """Greedy answers to requests {"id", "prompt_token_ids", "max_tokens", "stop_token_ids"} (EOS
    and the stop ids end a request), in one batched generate(). Returns ([{"id", "token_ids",
    "prefill_s", "decode_s"}], wall seconds); the times are None without the engine's log_stats."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=int(r["max_tokens"]),
                             stop_token_ids=list(r.get("stop_token_ids") or []) or None) for r in requests]
    inputs = [{"prompt_token_ids": list(r["prompt_token_ids"])} for r in requests]
    start = time.perf_counter()
    results = llm.generate(inputs, params, use_tqdm=False) if requests else []
    seconds = time.perf_counter() - start
    out = []
    for request, result in zip(requests, results):
        stats = getattr(result, "metrics", None)
        prefill_s = decode_s = None
        if stats is not None and getattr(stats, "first_token_ts", 0) and getattr(stats, "scheduled_ts", 0):
            prefill_s = max(0.0, stats.first_token_ts - stats.scheduled_ts)
            decode_s = max(0.0, stats.last_token_ts - stats.first_token_ts)
        out.append({"id": request["id"], "token_ids": list(result.outputs[0].token_ids), "prefill_s": prefill_s,
                    "decode_s": decode_s})
    return out, seconds


def engine_versions() -> dict:
    """Versions in the vLLM environment (it differs from the main one: vllm-cpu pins transformers)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("vllm-cpu", "vllm", "torch", "transformers", "tokaccel"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    out["vllm"] = out.pop("vllm-cpu", None) or out.get("vllm", "")
    return out


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def needed_model_len(requests: list[dict], block_size: int | None) -> int:
    """The longest prompt + its new tokens, rounded up to whole cache blocks."""
    longest = max((len(r["prompt_token_ids"]) + int(r["max_tokens"]) for r in requests), default=1)
    step = block_size or 16
    return -(-longest // step) * step


def generate_main(argv=None) -> int:
    """`python -m tokaccel.vllm.run generate ...` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m tokaccel.vllm.run generate",
                                     description="greedy answers to token-id requests (JSONL) through vLLM")
    parser.add_argument("--model", required=True, help="model folder (safetensors + tokenizer)")
    parser.add_argument("--input", required=True, help="JSONL: {id, prompt_token_ids, max_tokens, stop_token_ids}")
    parser.add_argument("--output", required=True, help="JSONL to write: {id, token_ids, prefill_s, decode_s}")
    parser.add_argument("--meta", default=None, help="JSON to write: versions, settings, wall times")
    parser.add_argument("--policy", default=None, help="tokaccel spec (default: vLLM's own attention)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the longest request, in blocks")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    args = parser.parse_args(argv)
    requests = read_jsonl(args.input)
    max_model_len = args.max_model_len or needed_model_len(requests, args.block_size)
    started = time.perf_counter()
    llm = engine(args.model, args.policy, max_model_len, args.max_num_seqs, args.block_size, dtype=args.dtype,
                 log_stats=True)
    engine_s = time.perf_counter() - started
    outputs, seconds = generate_requests(llm, requests)
    write_jsonl(args.output, outputs)
    if args.meta:
        meta = {"versions": engine_versions(), "policy": args.policy, "dtype": args.dtype, "block_size": args.block_size,
                "max_model_len": max_model_len, "max_num_seqs": args.max_num_seqs, "engine_start_s": engine_s,
                "generate_s": seconds, "requests": len(requests)}
        Path(args.meta).write_text(json.dumps(meta, indent=2))
    return 0


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["generate"]:
        return generate_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSON file: list of strings or token-id lists")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--policy", default=None)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=None, help="KV cache block size (vLLM's CPU default: 128)")
    parser.add_argument("--repeat-with-max-tokens", type=int, default=None,
                        help="run the prompts again with this many new tokens, to subtract prefill time")
    parser.add_argument("--out", required=True, help="JSON file to write (vLLM logs to stdout)")
    parser.add_argument("--warmup", action="store_true", help="one short generate() first (not timed)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks (vLLM worker processes)")
    args = parser.parse_args(argv)
    with open(args.prompts) as f:
        prompts = json.load(f)
    llm = engine(args.model, args.policy, args.max_model_len, args.max_num_seqs, args.block_size,
                 tensor_parallel=args.tensor_parallel_size)
    if args.warmup:
        generate(llm, prompts[:1], 2)
    outputs, seconds = generate(llm, prompts, args.max_tokens)
    result = {"outputs": outputs, "seconds": seconds}
    if args.repeat_with_max_tokens is not None:
        result["seconds_short"] = generate(llm, prompts, args.repeat_with_max_tokens)[1]
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


# ---------------------------------------------------------------- the main environment's side


def vllm_venv() -> Path:
    """$TOKACCEL_VLLM_VENV, default $TOKACCEL_CACHE/vllm/venv (where scripts/setup_vllm.sh puts it)."""
    from ..models import cache_dir

    return Path(os.environ.get("TOKACCEL_VLLM_VENV") or cache_dir() / "vllm" / "venv").expanduser()


def vllm_python() -> Path:
    """The vLLM environment's python; FileNotFoundError (saying how to make it) when it is missing."""
    venv = vllm_venv()
    python = venv / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"no vLLM environment in {venv} ({python} is missing): {SETUP_HINT}, "
                                "or point TOKACCEL_VLLM_VENV at one")
    return python


def vllm_model_dir(model: str) -> Path:
    """The folder vLLM loads for `model`: the embedded SmolLM2's export ($TOKACCEL_VLLM_MODEL, default
    $TOKACCEL_CACHE/vllm/smollm2-135m-instruct) or a local model folder. ValueError for anything
    else (vLLM here serves no GGUF and downloads nothing); FileNotFoundError when the export is missing."""
    from ..models import cache_dir, resolve_name

    if resolve_name(str(model)) == EMBEDDED_MODEL:
        folder = Path(os.environ.get("TOKACCEL_VLLM_MODEL") or cache_dir() / "vllm" / EMBEDDED_MODEL).expanduser()
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"no exported {EMBEDDED_MODEL} folder in {folder}: {SETUP_HINT} "
                                    "(or set TOKACCEL_VLLM_MODEL)")
        return folder
    folder = Path(str(model)).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise ValueError(f"{folder} is no model folder (no config.json)")
        return folder
    raise ValueError(f"the vLLM engine runs the embedded {EMBEDDED_MODEL} (exported by ./run.sh vllm-setup) or a "
                     f"local model folder with safetensors and tokenizer files; got {model!r}")


def vllm_policy(spec) -> str | None:
    """A policy spec checked for vLLM, before any engine starts: None for "dense" (vLLM's own
    attention), the spec itself for tokenselect / quest (options validated by make_vllm_policy);
    ValueError for anything else."""
    from ..registry import parse_spec
    from . import make_vllm_policy
    from .paged import SUPPORTED_POLICIES

    supported = "dense (vLLM's own attention), " + ", ".join(f"{p}:..." for p in SUPPORTED_POLICIES)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"the vLLM engine takes policy specs: {supported}; got {spec!r}")
    spec = spec.strip()
    if spec.lower() == "dense":
        return None
    try:
        name = parse_spec(spec)[0]
    except ValueError:
        name = spec
    if name not in SUPPORTED_POLICIES:
        raise ValueError(f"policy {spec!r} does not run in vLLM; the vLLM engine runs {supported}")
    make_vllm_policy(spec)  # unknown or bad options: ValueError now, not inside vLLM's workers
    return spec


def model_max_len(model_dir: str | Path) -> int | None:
    """max_position_embeddings of a model folder's config.json (None when it has none)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return int(value) if value else None


def launch(cmd: list[str], env: dict, log_path: Path) -> int:
    """Run one command of the vLLM environment, its output into `log_path`; the exit status.
    (Tests replace this with a fake engine.)"""
    with open(log_path, "w") as log:
        return subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def run_in_vllm(args: list[str], log_path: Path) -> None:
    """`<vLLM env python> ARGS` with this checkout's tokaccel first on the path, no
    $TOKACCEL_VLLM_POLICY (the caller chooses the policy) and VLLM_CPU_KVCACHE_SPACE defaulting to
    2; RuntimeError with the end of its log when it fails."""
    from . import ENV_POLICY

    python = vllm_python()
    env = dict(os.environ)
    env.pop(ENV_POLICY, None)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").exists():  # a source checkout: the engine runs this very code
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    code = launch([str(python), *args], env, Path(log_path))
    if code != 0:
        tail = Path(log_path).read_text(errors="replace")[-4000:] if Path(log_path).exists() else ""
        raise RuntimeError(f"the vLLM run failed (exit {code}): {python} {' '.join(args)}\n{tail}")


def generate_via_vllm(requests: list[dict], model_dir: str | Path, policy: str | None, dtype: str = "float32",
                      block_size: int = DEFAULT_BLOCK_SIZE, max_num_seqs: int = 16,
                      log_dir: str | Path | None = None) -> tuple[dict[str, dict], dict]:
    """Greedy answers to `requests` ({"id", "prompt_token_ids", "max_tokens", "stop_token_ids"})
    through `python -m tokaccel.vllm.run generate` in the vLLM environment (one engine). Returns
    ({id: {"token_ids", "prefill_s", "decode_s"}}, meta). log_dir: keep vLLM's log there."""
    if not requests:
        return {}, {}
    check_int("tokaccel.vllm", "positions (longest prompt + new tokens)", needed_model_len(requests, block_size), 1,
              model_max_len(model_dir))
    with tempfile.TemporaryDirectory(prefix="tokaccel-vllm-") as tmp:
        tmp = Path(tmp)
        write_jsonl(tmp / "requests.jsonl", requests)
        args = ["-m", "tokaccel.vllm.run", "generate", "--model", str(model_dir), "--input", str(tmp / "requests.jsonl"),
                "--output", str(tmp / "outputs.jsonl"), "--meta", str(tmp / "meta.json"), "--dtype", dtype,
                "--block-size", str(block_size), "--max-num-seqs", str(max_num_seqs)]
        if policy:
            args += ["--policy", policy]
        log = Path(log_dir) / "vllm.log" if log_dir else tmp / "vllm.log"
        started = time.perf_counter()
        run_in_vllm(args, log)
        outputs = {row["id"]: row for row in read_jsonl(tmp / "outputs.jsonl")}
        meta = json.loads((tmp / "meta.json").read_text()) if (tmp / "meta.json").exists() else {}
    meta["process_s"] = time.perf_counter() - started
    missing = [r["id"] for r in requests if r["id"] not in outputs]
    if missing:
        raise RuntimeError(f"the vLLM run returned no output for {len(missing)} request(s), e.g. {missing[:3]}")
    return outputs, meta


if __name__ == "__main__":
    raise SystemExit(main())
