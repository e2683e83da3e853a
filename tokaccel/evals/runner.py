"""The eval runner: (model, task, length, policy) -> a result folder, skipped when it exists.

    results = run_eval("smollm2-135m-instruct", policies=["dense"], tasks=["passkey"],
                       lengths=[1024, 2048], samples=5, out="results")

Each combination gets `<out>/<model>/<task>/<length>/<policy>-<hash>/` holding `config.json`
(everything that defines the run), `metrics.json` (score, timing, policy stats) and
`predictions.jsonl` (one line per sample). The hash covers the policy's config and the run
settings, so changing `samples` or `seed` writes a new folder instead of reusing a stale one.
Every policy sees the same prompts; a context is prefilled once per sample and, for tasks with
several questions, its cache is copied for each question.

Policies: any tokaccel policy spec ("dense", "tokenselect:k=1024") or Policy instance, "none"
(the unpatched model), or a kvpress press ("kvpress:snapkv@0.5", see peers.py).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ..validation import invalid
from . import metrics as scoring
from .decoding import eos_ids, greedy, prefill
from .perplexity import perplexity_ids
from .samples import Sample, Task, short_hash
from .tasks import get_task, make_samples

logger = logging.getLogger(__name__)

QUICK = {"model": "smollm2-135m-instruct", "tasks": ["passkey", "niah_single"], "lengths": [1024, 2048], "samples": 5}
TINY = {"model": "smollm2-135m-instruct", "tasks": ["passkey", "niah_multiquery_sep"], "lengths": [256], "samples": 2}


# ---------------------------------------------------------------- methods (what runs on the model)


def policy_label(spec, policy) -> str:
    """Readable name of a policy for tables: "name" or "name:key=value,..." (non-default values)."""
    from ..registry import parse_spec

    if isinstance(spec, str):
        name, config = parse_spec(spec)
        return name.lower() + (":" + ",".join(f"{k}={v}" for k, v in sorted(config.items())) if config else "")
    defaults = {f.name: f.default for f in dataclasses.fields(policy) if f.default is not dataclasses.MISSING}
    changed = {k: v for k, v in policy.config().items() if k not in defaults or defaults[k] != v}
    return policy.name + (":" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) if changed else "")


class PolicyMethod:
    """A tokaccel policy: the model is patched for the whole run of one (task, length)."""

    kind = "tokaccel"
    prefill_chunk = "runner"

    def __init__(self, spec):
        from ..registry import make_policy

        self.spec = spec
        self.policy = make_policy(spec)  # validates now: ValueError for unknown names / options
        self.name = self.policy.name
        self.label = policy_label(spec, self.policy)

    def config(self) -> dict:
        return self.policy.config()

    @contextlib.contextmanager
    def session(self, model):
        from ..patch import get_policy, patched, reset_stats
        from ..registry import make_policy

        with patched(model, make_policy(self.spec) if isinstance(self.spec, str) else self.policy):
            self.provenance = get_policy(model).provenance()
            reset_stats(model)
            yield

    def prefill_context(self, model):
        return contextlib.nullcontext()

    def stats(self, model) -> dict:
        from ..patch import stats

        return stats(model)


class UnpatchedMethod:
    """The model exactly as loaded ("none")."""

    kind = name = label = "none"
    prefill_chunk = "runner"

    def config(self) -> dict:
        return {}

    def session(self, model):
        return contextlib.nullcontext()

    def prefill_context(self, model):
        return contextlib.nullcontext()

    def stats(self, model) -> dict:
        return {}


def make_method(spec):
    """A runnable method from a policy spec / Policy instance, "none", or "kvpress:<press>@<ratio>"."""
    if isinstance(spec, str) and spec.strip().lower() in ("none", "unpatched"):
        return UnpatchedMethod()
    if isinstance(spec, str) and spec.strip().startswith("kvpress:"):
        from .peers import KVPressMethod

        return KVPressMethod(spec)
    return PolicyMethod(spec)


# ---------------------------------------------------------------- running one sample


def answer_questions(model, tokenizer, sample: Sample, method, chunk: int | None, stop: set[int], reuse_context: bool = True) -> list[dict]:
    """Greedy answers to every question of a sample. reuse_context: prefill the shared context
    once and decode each question on a copy of its cache; otherwise prefill each full prompt."""
    n_ctx, outputs = len(sample.context_ids), []
    if reuse_context:
        started = time.perf_counter()
        with method.prefill_context(model):
            cache, logits = prefill(model, sample.context_ids, chunk=chunk)
        prefill_s = time.perf_counter() - started
        for i, question in enumerate(sample.questions):
            own = cache if i == len(sample.questions) - 1 else copy.deepcopy(cache)
            started = time.perf_counter()
            ids = greedy(model, own, question.ids, n_ctx, sample.max_new_tokens, stop, chunk, first_logits=logits)
            outputs.append({"ids": ids, "prefill_s": prefill_s if i == 0 else 0.0, "decode_s": time.perf_counter() - started})
        return outputs
    for question in sample.questions:
        prompt = sample.context_ids + question.ids
        started = time.perf_counter()
        with method.prefill_context(model):
            cache, _ = prefill(model, prompt[:-1], chunk=chunk)
        prefill_s = time.perf_counter() - started
        ids = greedy(model, cache, prompt[-1:], len(prompt) - 1, sample.max_new_tokens, stop, chunk)
        outputs.append({"ids": ids, "prefill_s": prefill_s, "decode_s": time.perf_counter() - prefill_s - started})
    return outputs


def _run_sample(model, tokenizer, sample: Sample, task: Task, method, chunk, stop, reuse_context) -> dict:
    if task.kind == "ppl":
        r = perplexity_ids(model, sample.context_ids, sample.info["eval_len"], chunk, sample.info["eval_chunk"],
                           prefill_context=method.prefill_context)
        return {"index": sample.index, "prompt_tokens": len(sample.context_ids), "score": r["ppl"], "nll": r["nll"],
                "eval_len": r["eval_len"], "prefill_s": r["prefill_s"], "decode_s": r["total_s"] - r["prefill_s"], "new_tokens": 0}
    outputs = answer_questions(model, tokenizer, sample, method, chunk, stop, reuse_context)
    questions = []
    for question, out in zip(sample.questions, outputs):
        text = tokenizer.decode(out["ids"], skip_special_tokens=True)
        value = scoring.score(sample.metric, text, question.answers, **sample.metric_args)
        questions.append({"prediction": text, "answers": question.answers, "score": value, "new_tokens": len(out["ids"])})
    row = {
        "index": sample.index,
        "prompt_tokens": sample.prompt_tokens,
        "depth": sample.depth,
        "score": sum(q["score"] for q in questions) / len(questions),
        "prediction": questions[0]["prediction"],
        "answers": questions[0]["answers"],
        "new_tokens": sum(q["new_tokens"] for q in questions),
        "prefill_s": sum(o["prefill_s"] for o in outputs),
        "decode_s": sum(o["decode_s"] for o in outputs),
    }
    if len(questions) > 1:
        row["questions"] = questions
    if sample.info:
        row["info"] = sample.info
    return row


def evaluate(model, tokenizer, samples: list[Sample], task: Task, method, prefill_chunk: int | None = 2048,
             reuse_context: bool = True, bar=None) -> tuple[list[dict], dict]:
    """Run `method` on every sample; returns (prediction rows, metrics)."""
    chunk = prefill_chunk if method.prefill_chunk == "runner" else method.prefill_chunk
    stop = eos_ids(model, tokenizer)
    rows = []
    started = time.perf_counter()
    with method.session(model):
        for sample in samples:
            rows.append(_run_sample(model, tokenizer, sample, task, method, chunk, stop, reuse_context))
            if bar is not None:
                bar.update(1)
        policy_stats = method.stats(model)
    return rows, aggregate(rows, task, time.perf_counter() - started, policy_stats)


def aggregate(rows: list[dict], task: Task, total_s: float, policy_stats: dict) -> dict:
    n = len(rows)
    prefill_s = sum(r["prefill_s"] for r in rows)
    decode_s = sum(r["decode_s"] for r in rows)
    new_tokens = sum(r["new_tokens"] for r in rows)
    out = {"task": task.spec or task.name, "metric": task.metric, "n_samples": n,
           "prompt_tokens_mean": sum(r["prompt_tokens"] for r in rows) / max(n, 1)}
    if task.kind == "ppl":
        nll = sum(r["nll"] for r in rows) / max(n, 1)
        out.update(score=math.exp(nll), nll=nll, higher_is_better=False)
    else:
        out.update(score=100.0 * sum(r["score"] for r in rows) / max(n, 1), higher_is_better=True,
                   n_questions=sum(len(r.get("questions", [0])) for r in rows))
        if task.has_depth:
            by_depth: dict[str, list[float]] = {}
            for r in rows:
                by_depth.setdefault(f"{round(r['depth'], 1):.1f}", []).append(r["score"])
            out["by_depth"] = {k: 100.0 * sum(v) / len(v) for k, v in sorted(by_depth.items())}
    out["timing"] = {
        "total_s": total_s,
        "prefill_s_mean": prefill_s / max(n, 1),
        "decode_s_mean": decode_s / max(n, 1),
        "new_tokens": new_tokens,
        "decode_tokens_per_s": new_tokens / decode_s if decode_s > 0 and new_tokens else None,
    }
    out["policy_stats"] = policy_stats
    if "selection_hit_rate" in policy_stats:
        out["selection_hit_rate"] = policy_stats["selection_hit_rate"]
    return out


# ---------------------------------------------------------------- result folders


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "x"


def result_dir(out, model_name: str, task: Task, length: int, method, settings: dict) -> Path:
    digest = short_hash({"policy": method.label, "config": method.config(), **settings}, 8)
    return Path(out) / slug(model_name) / task.label / str(length) / f"{slug(method.name)}-{digest}"


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def write_result(folder: Path, config: dict, metrics: dict, rows: list[dict]) -> None:
    """Write the three files into a temporary folder, then move it into place (atomic)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    _write_json(tmp / "config.json", config)
    with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
    _write_json(tmp / "metrics.json", metrics)
    if folder.exists():  # an incomplete folder from an interrupted run
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def warn_if_calibration_changed(folder: Path) -> bool:
    """Warn (and return True) when a result's calibration file (FASA's, `policy_provenance`) now
    holds other content than the run used: the folder's hash covers the policy's options, not
    the file, so a rerun would otherwise reuse the old result silently."""
    from ..policies.fasa import content_digest

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    used = (config.get("policy_provenance") or {}).get("calibration") or {}
    source = Path(used.get("source") or "")
    if not used.get("sha256") or not source.is_file():
        return False
    if content_digest(json.loads(source.read_text())) == used["sha256"]:
        return False
    warnings.warn(f"{folder} was computed with another calibration than {source} holds now (sha256 "
                  f"{used['sha256']}); its result is reused: pass --force (force=True) to recompute", RuntimeWarning)
    return True


def load_result(folder: str | Path) -> dict:
    """The result dict of a finished result folder."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    return {
        "model": config["model"], "task": config["task"], "length": config["length"], "policy": config["policy"],
        "policy_label": config["policy_label"], "metric": metrics["metric"], "score": metrics["score"],
        "n_samples": metrics["n_samples"], "folder": str(folder), "config": config, "metrics": metrics,
    }


def collect_results(path: str | Path) -> list[dict]:
    """Every finished result folder under `path`; for one (model, task, length, policy) the run
    with the most samples wins."""
    best: dict[tuple, dict] = {}
    root = Path(path)
    for metrics_file in sorted(root.rglob("metrics.json")):
        hidden = any(part.startswith(".") for part in metrics_file.relative_to(root).parts)
        if hidden or not (metrics_file.parent / "config.json").exists():
            continue  # a folder still being written, or not a result
        try:
            result = load_result(metrics_file.parent)
        except (ValueError, KeyError) as e:
            logger.warning("ignoring %s: %s", metrics_file.parent, e)
            continue
        key = (result["model"], result["task"], result["length"], result["policy_label"], result["config"].get("dtype"),
               result["config"].get("engine", "hf"))
        if key not in best or result["n_samples"] > best[key]["n_samples"]:
            best[key] = result
    dtypes: dict[tuple, set] = {}
    for model, _, _, label, dtype, _ in best:
        dtypes.setdefault((model, label), set()).add(dtype)
    for (model, _, _, label, dtype, _), result in best.items():
        if len(dtypes[(model, label)]) > 1:  # one folder, several dtypes: keep them apart in tables and plots
            result["policy_label"] = f"{label} ({dtype})"
    return list(best.values())


def _format_score(result: dict) -> str:
    value = result["score"]
    return f"{value:.2f}" if result["metric"] == "ppl" else f"{value:.1f}"


def summary_table(results: list[dict]) -> str:
    """Markdown table: one row per (model, task, length), one column per policy label.
    Scores are 0-100 (RULER/LongBench style); `ppl` rows show perplexity (lower is better)."""
    columns: list[str] = []
    rows: dict[tuple, dict] = {}
    for r in results:
        if r["policy_label"] not in columns:
            columns.append(r["policy_label"])
        rows.setdefault((r["model"], r["task"], r["length"]), {})[r["policy_label"]] = _format_score(r)
    lines = ["| model | task | length | " + " | ".join(columns) + " |", "|---|---|---:|" + "---:|" * len(columns)]
    for (model, task, length), cells in rows.items():
        lines.append(f"| {model} | {task} | {length} | " + " | ".join(cells.get(c, "-") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def length_tables(results: list[dict]) -> str:
    """Markdown, one table per (model, policy, dtype): a row per task, a column per length, each
    cell the score with its sample count, e.g. "95.0 (20)". A policy other than dense also shows
    its difference to dense on the same cell ("90.0 (20) -5.0") and a row of selection-cache hit
    rates (mean over the tasks) when the policy has a selection cache."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["model"], r["policy_label"], r["config"].get("dtype")), []).append(r)
    dense = {(r["model"], r["task"], r["length"], r["config"].get("dtype"), r["config"].get("engine", "hf")): r
             for r in results if r["policy"] == "dense"}
    for (model, label, dtype), rows in sorted(groups.items(), key=lambda item: tuple(map(str, item[0]))):
        lengths = sorted({r["length"] for r in rows})
        tasks = list(dict.fromkeys(r["task"] for r in sorted(rows, key=lambda r: r["task"])))
        cells = {(r["task"], r["length"]): _cell(r, dense.get((model, r["task"], r["length"], dtype,
                                                               r["config"].get("engine", "hf")))) for r in rows}
        out.append(f"**{model}, {label}, {dtype}** (score, samples" + (", difference to dense)\n"
                   if any(r["policy"] != "dense" for r in rows) else ")\n"))
        out.append("| task | " + " | ".join(length_name(n) for n in lengths) + " |")
        out.append("|---|" + "---:|" * len(lengths))
        out += [f"| {t} | " + " | ".join(cells.get((t, n), "-") for n in lengths) + " |" for t in tasks]
        hit_rates = {n: [r["metrics"]["selection_hit_rate"] for r in rows
                         if r["length"] == n and r["metrics"].get("selection_hit_rate") is not None] for n in lengths}
        if any(hit_rates.values()):
            out.append("| selection-cache hit rate | " + " | ".join(
                f"{sum(v) / len(v):.2f}" if v else "-" for v in hit_rates.values()) + " |")
        out.append("")
    return "\n".join(out)


def _cell(result: dict, dense: dict | None) -> str:
    text = f"{_format_score(result)} ({result['n_samples']})"
    if dense is None or dense is result or result["policy"] == "dense" or result["metric"] != dense["metric"]:
        return text
    return f"{text} {result['score'] - dense['score']:+.{2 if result['metric'] == 'ppl' else 1}f}"


def length_name(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


# ---------------------------------------------------------------- the entry point


def _model_name(model, explicit: str | None) -> str:
    from ..models import EMBEDDED, resolve_name

    if explicit:
        return explicit
    if isinstance(model, str):
        name = resolve_name(model)
        return name if name in EMBEDDED else Path(name.rstrip("/")).name
    base = Path(str(getattr(model, "name_or_path", "") or type(model).__name__).rstrip("/")).name
    match = re.match(r"(.+)-tf\d", base)
    return match.group(1) if match and match.group(1) in EMBEDDED else base


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[str(dtype).replace("torch.", "")]
    except KeyError:
        raise invalid("run_eval", "dtype", dtype, "choose one of float32, bfloat16, float16 (or a torch.dtype)") from None


def _device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def warm_up(model) -> None:
    """One small forward so one-time kernel setup does not count in the first sample's timing."""
    with torch.no_grad():
        prefill(model, list(range(100, 116)), chunk=None)


def versions() -> dict:
    import transformers

    from .. import __version__

    return {"tokaccel": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


def code_state(device) -> dict:
    """{"git_commit", "git_dirty", "device_name"}: the tokaccel checkout and the machine a result was
    measured with (recorded in config.json so docs/results can say whether the code was committed)."""
    from ..bench.results import device_name, git_commit

    commit, dirty = git_commit()
    return {"git_commit": commit, "git_dirty": dirty, "device_name": device_name(device)}


def run_eval(model="smollm2-135m-instruct", policies=("dense",), tasks=("passkey",), lengths=(1024,), samples: int = 5,
             out: str | Path = "results", seed: int = 0, *, model_name: str | None = None, chat: bool | None = None,
             dtype="float32", device: str = "cpu", prefill_chunk: int | None = 2048, data_dirs: dict | None = None,
             force: bool = False, reuse_context: bool = True, progress: bool = True, write_summary: bool = True,
             threads: int | None = None, engine: str = "hf") -> list[dict]:
    """Evaluate every (task, length, policy) on `model` and write result folders under `out`.

    model: an embedded name / HF id / path (loaded with tokaccel.models.load, only if some result
    is missing) or a (model, tokenizer) pair (must be unpatched). policies: specs or Policy
    instances, "none", "kvpress:<press>@<ratio>". tasks: names from tokaccel.evals.tasks
    (with options "name:key=value"), "longbench:<dataset>", "infbench:<task>" (folders in
    `data_dirs`). chat: None = the chat template when the tokenizer has one. Existing result
    folders are read, not recomputed (force=True recomputes). threads: torch CPU threads for this
    call (1 is far faster on a CPU shared with other jobs). Returns one dict per result (model,
    task, length, policy, policy_label, metric, score, n_samples, folder, config, metrics,
    skipped) and writes `<out>/summary.md` (every result in the folder, see `length_tables`).
    engine: "hf" (this process, transformers) or "vllm" (a vLLM engine in the vLLM environment on
    the same prompts: embedded SmolLM2 or a model folder, policies dense / tokenselect / quest;
    tokaccel.evals.vllm_engine; prefill_chunk, reuse_context and threads do not apply).
    """
    if engine == "vllm":
        from .vllm_engine import run_eval_vllm

        return run_eval_vllm(model, policies=policies, tasks=tasks, lengths=lengths, samples=samples, out=out,
                             seed=seed, model_name=model_name, chat=chat, dtype=dtype, device=device,
                             data_dirs=data_dirs, force=force, progress=progress, write_summary=write_summary)
    if engine != "hf":
        raise invalid("run_eval", "engine", engine, 'choose "hf" or "vllm"')
    methods = [make_method(p) for p in policies]
    if len({m.label for m in methods}) != len(methods):
        raise ValueError(f"policies repeat: {[m.label for m in methods]}")
    task_list = [get_task(t) for t in tasks]
    lengths = [int(n) for n in lengths]
    name = _model_name(model if isinstance(model, str) else model[0], model_name)
    dtype_name = str(model[0].dtype).replace("torch.", "") if not isinstance(model, str) else str(_torch_dtype(dtype)).replace("torch.", "")
    loaded = None if isinstance(model, str) else (model[0], model[1])
    if loaded is not None:
        from ..patch import get_policy

        if get_policy(loaded[0]) is not None:
            raise ValueError("run_eval patches the model for each policy: pass an unpatched model")

    from tqdm.auto import tqdm

    results: list[dict] = []
    warmed = False
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    bar = tqdm(total=len(task_list) * len(lengths) * len(methods) * samples, unit="sample", desc="eval", disable=not progress)
    try:
        for task in task_list:
            for length in lengths:
                built = None
                settings = {"task": task.spec or task.name, "params": task.params, "metric": task.metric,
                            "max_new_tokens": task.max_new_tokens, "samples": samples, "seed": seed, "chat": chat,
                            "dtype": dtype_name, "prefill_chunk": prefill_chunk}
                if not reuse_context:  # (only when set: keeps the folders of earlier results)
                    settings["reuse_context"] = False
                for method in methods:
                    folder = result_dir(out, name, task, length, method, settings)
                    if not force and (folder / "metrics.json").exists():
                        logger.info("exists, skipped: %s", folder)
                        warn_if_calibration_changed(folder)
                        results.append({**load_result(folder), "skipped": True})
                        bar.update(samples)
                        continue
                    if loaded is None:
                        from ..models import load

                        loaded = load(model, dtype=_torch_dtype(dtype), device=_device(device))
                    net, tokenizer = loaded
                    if not warmed:
                        warm_up(net)
                        warmed = True
                    if built is None:
                        built = make_samples(task, tokenizer, length, samples, seed, chat, data_dirs=data_dirs)
                        bar.total += (len(built) - samples) * len(methods)
                        bar.refresh()
                    bar.set_description(f"{task.name} {length} {method.label}")
                    rows, metrics = evaluate(net, tokenizer, built, task, method, prefill_chunk, reuse_context, bar)
                    config = {
                        "model": name, "model_class": type(net).__name__, "task": task.spec or task.name,
                        "task_kind": task.kind, "task_params": task.params, "metric": task.metric,
                        "max_new_tokens": task.max_new_tokens, "length": length, "samples": samples, "seed": seed,
                        "chat": chat, "chat_template_used": bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat,
                        "dtype": dtype_name, "device": str(next(net.parameters()).device), "prefill_chunk": prefill_chunk,
                        "reuse_context": reuse_context, "policy": method.name, "policy_label": method.label,
                        "policy_kind": method.kind, "policy_config": method.config(), "versions": versions(),
                        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        **code_state(next(net.parameters()).device),
                    }
                    if getattr(method, "provenance", None):  # e.g. FASA's calibration file and settings
                        config["policy_provenance"] = method.provenance
                    if data_dirs and task.kind in data_dirs:
                        config["data_dir"] = str(data_dirs[task.kind])
                    write_result(folder, config, metrics, rows)
                    logger.info("%s %s %d %s: %s %.2f -> %s", name, task.name, length, method.label, task.metric, metrics["score"], folder)
                    results.append({**load_result(folder), "skipped": False})
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
    if write_summary and results:
        write_folder_summary(out)
    return results


def write_folder_summary(out: str | Path) -> Path:
    """`<out>/summary.md`: `length_tables` of every result in the folder, earlier runs included."""
    path = Path(out) / "summary.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(length_tables(collect_results(out)), encoding="utf-8")
    return path
