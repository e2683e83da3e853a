"""`tokaccel eval --engine vllm`: the eval tasks through a real vLLM engine (CPU), with vLLM's own
attention ("dense") or tokaccel's backend (tokenselect / quest specs).

This process builds the samples exactly as the HF engine does (same tokenizer, chat template and
seed, so the same prompt token ids), hands every prompt of one policy (all tasks and lengths) as
token ids to `python -m tokaccel.vllm.run generate` in the vLLM environment (one engine per
policy; scripts/setup_vllm.sh makes it), reads the greedy token ids back, decodes and scores them
with the task's metric and writes result folders like the HF engine's. Their config.json says
"engine": "vllm" with the vLLM environment's versions; the folder hash covers the engine, the
folder name starts with "vllm-" and the policy label ends in " (vllm)", so vLLM results never mix
with HF results in tables, reports and reuse.

Differences from the HF engine: each prompt (context + question) is prefilled whole, in vLLM's
own chunks (`prefill_chunk` is None, `reuse_context` False); all prompts of a policy run batched,
so per-sample times overlap (vLLM's request stats); no perplexity task; no policy statistics.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from pathlib import Path

from . import metrics as scoring
from .runner import aggregate, code_state, load_result, policy_label, result_dir, versions, write_folder_summary, write_result
from .tasks import get_task, make_samples

logger = logging.getLogger(__name__)

ENGINE = "vllm"
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
          "fp16": "float16"}


class VLLMMethod:
    """One policy run by vLLM: "dense" (vLLM's own attention) or a tokenselect / quest spec."""

    kind = "vllm"

    def __init__(self, spec: str):
        from ..vllm.run import vllm_policy

        self.policy = vllm_policy(spec)  # None for dense; ValueError for what vLLM cannot run
        if self.policy is None:
            self.name, base, self._config = "dense", "dense", {"attention": "vllm"}
        else:
            from ..vllm import make_vllm_policy

            policy = make_vllm_policy(self.policy)
            self.name, base, self._config = policy.name, policy_label(self.policy, policy), policy.config()
        self.label = f"{base} ({ENGINE})"

    def config(self) -> dict:
        return dict(self._config)


def load_tokenizer(model: str):
    """The tokenizer the HF engine uses for `model` (an embedded model's GGUF tokenizer, else the
    folder's own), so prompts are the same token ids."""
    from transformers import AutoTokenizer

    from ..models import EMBEDDED, gguf_path, resolve_name

    name = resolve_name(model)
    if name in EMBEDDED:
        gguf = gguf_path(name)
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(str(Path(model).expanduser()))


def display_name(model: str, explicit: str | None = None) -> str:
    from ..models import EMBEDDED, resolve_name

    if explicit:
        return explicit
    name = resolve_name(model)
    return name if name in EMBEDDED else Path(str(model).rstrip("/")).name


def stop_ids(tokenizer, model_dir: Path) -> list[int]:
    """EOS ids, as the HF engine stops: the tokenizer's and the model's generation config's."""
    import json

    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    try:
        eos = json.loads((Path(model_dir) / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        eos = None
    ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    return sorted(ids)


def check(model, policies, tasks, dtype: str = "float32", device: str = "cpu"):
    """Everything `run_eval_vllm` needs, checked before any engine starts: (model folder, methods,
    tasks, dtype name). ValueError / FileNotFoundError with what to do."""
    from ..vllm.run import vllm_model_dir, vllm_python

    if not isinstance(model, str):
        raise ValueError("the vLLM engine takes a model name or folder, not a loaded model")
    if str(device) not in ("cpu", "auto"):
        raise ValueError(f"the vLLM engine runs on CPU here (vLLM's CPU build); got device {device!r}")
    if str(dtype).replace("torch.", "") not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose float32, bfloat16 or float16")
    methods = [VLLMMethod(p) for p in policies]
    if len({m.label for m in methods}) != len(methods):
        raise ValueError(f"policies repeat: {[m.label for m in methods]}")
    task_list = [get_task(t) for t in tasks]
    for task in task_list:
        if task.kind == "ppl":
            raise ValueError(f"task {task.name}: perplexity needs the model's logits; the vLLM engine runs generation "
                             "tasks only")
    folder = vllm_model_dir(model)
    vllm_python()
    return folder, methods, task_list, DTYPES[str(dtype).replace("torch.", "")]


def run_eval_vllm(model="smollm2-135m-instruct", policies=("dense",), tasks=("passkey",), lengths=(1024,),
                  samples: int = 5, out: str | Path = "results", seed: int = 0, *, model_name: str | None = None,
                  chat: bool | None = None, dtype="float32", device: str = "cpu", data_dirs: dict | None = None,
                  force: bool = False, progress: bool = True, write_summary: bool = True, tokenizer=None,
                  block_size: int | None = None) -> list[dict]:
    """`run_eval(..., engine="vllm")`: the same result dicts and folders (see the module docstring).
    tokenizer: the prompts' tokenizer (default: the one the HF engine loads for `model`)."""
    from ..vllm.run import DEFAULT_BLOCK_SIZE, generate_via_vllm

    folder_model, methods, task_list, dtype_name = check(model, policies, tasks, dtype, device)
    block_size = block_size or DEFAULT_BLOCK_SIZE
    name = display_name(model, model_name)
    lengths = [int(n) for n in lengths]
    results: dict[tuple, dict] = {}
    todo: dict[int, list[tuple]] = {}  # method index -> [(key, task, length, folder, samples)]
    built: dict[tuple, list] = {}
    for ti, task in enumerate(task_list):
        for li, length in enumerate(lengths):
            settings = {"task": task.spec or task.name, "params": task.params, "metric": task.metric,
                        "max_new_tokens": task.max_new_tokens, "samples": samples, "seed": seed, "chat": chat,
                        "dtype": dtype_name, "prefill_chunk": None, "reuse_context": False, "engine": ENGINE}
            for mi, method in enumerate(methods):
                folder = result_dir(out, name, task, length, method, settings)
                folder = folder.with_name(f"{ENGINE}-{folder.name}")
                if not force and (folder / "metrics.json").exists():
                    logger.info("exists, skipped: %s", folder)
                    results[(ti, li, mi)] = {**load_result(folder), "skipped": True}
                    continue
                if (ti, li) not in built:
                    if tokenizer is None:
                        tokenizer = load_tokenizer(model)
                    built[(ti, li)] = make_samples(task, tokenizer, length, samples, seed, chat, data_dirs=data_dirs)
                todo.setdefault(mi, []).append(((ti, li, mi), task, length, folder, built[(ti, li)]))
    stop = stop_ids(tokenizer, folder_model) if todo else []
    for mi, jobs in todo.items():
        method = methods[mi]
        requests = [{"id": f"{ti}/{li}/{s.index}/{q}", "prompt_token_ids": s.prompt_ids(q),
                     "max_tokens": s.max_new_tokens, "stop_token_ids": stop}
                    for (ti, li, _), _, _, _, built_samples in jobs for s in built_samples for q in range(len(s.questions))]
        if progress:
            print(f"vllm: {method.label}: {len(requests)} prompts, one engine ({folder_model})", file=sys.stderr,
                  flush=True)
        started = time.perf_counter()
        outputs, meta = generate_via_vllm(requests, folder_model, method.policy, dtype=dtype_name,
                                          block_size=block_size)
        total_s = time.perf_counter() - started
        for (key, task, length, folder, built_samples) in jobs:
            ti, li, _ = key
            rows = [_row(s, tokenizer, [outputs[f"{ti}/{li}/{s.index}/{q}"] for q in range(len(s.questions))])
                    for s in built_samples]
            metrics = aggregate(rows, task, total_s, {})
            metrics["timing"].update(batched=True, engine_start_s=meta.get("engine_start_s"),
                                     generate_s=meta.get("generate_s"), process_s=meta.get("process_s"))
            config = {
                "model": name, "model_class": None, "task": task.spec or task.name, "task_kind": task.kind,
                "task_params": task.params, "metric": task.metric, "max_new_tokens": task.max_new_tokens,
                "length": length, "samples": samples, "seed": seed, "chat": chat,
                "chat_template_used": bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat,
                "dtype": dtype_name, "device": "cpu", "prefill_chunk": None, "reuse_context": False,
                "policy": method.name, "policy_label": method.label, "policy_kind": method.kind,
                "policy_config": method.config(), "policy_spec": method.policy or "dense",
                "engine": ENGINE, "vllm_version": (meta.get("versions") or {}).get("vllm", ""),
                "vllm_versions": meta.get("versions") or {}, "vllm_model_dir": str(folder_model),
                "vllm_block_size": meta.get("block_size", block_size), "vllm_max_model_len": meta.get("max_model_len"),
                "versions": versions(),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **code_state("cpu"),
            }
            if data_dirs and task.kind in data_dirs:
                config["data_dir"] = str(data_dirs[task.kind])
            write_result(folder, config, metrics, rows)
            logger.info("%s %s %d %s: %s %.2f -> %s", name, task.name, length, method.label, task.metric,
                        metrics["score"], folder)
            results[key] = {**load_result(folder), "skipped": False}
    ordered = [results[key] for key in sorted(results)]
    if write_summary and ordered:
        write_folder_summary(out)
    return ordered


def _row(sample, tokenizer, outputs: list[dict]) -> dict:
    """A prediction row like the HF engine's, from vLLM's token ids for each question."""
    questions = []
    for question, out in zip(sample.questions, outputs):
        text = tokenizer.decode(out["token_ids"], skip_special_tokens=True)
        value = scoring.score(sample.metric, text, question.answers, **sample.metric_args)
        questions.append({"prediction": text, "answers": question.answers, "score": value,
                          "new_tokens": len(out["token_ids"])})
    row = {
        "index": sample.index, "prompt_tokens": sample.prompt_tokens, "depth": sample.depth,
        "score": sum(q["score"] for q in questions) / len(questions),
        "prediction": questions[0]["prediction"], "answers": questions[0]["answers"],
        "new_tokens": sum(q["new_tokens"] for q in questions),
        "prefill_s": sum(o.get("prefill_s") or 0.0 for o in outputs),
        "decode_s": sum(o.get("decode_s") or 0.0 for o in outputs),
        "token_ids": [o["token_ids"] for o in outputs] if len(outputs) > 1 else outputs[0]["token_ids"],
    }
    if len(questions) > 1:
        row["questions"] = questions
    if sample.info:
        row["info"] = sample.info
    return row
