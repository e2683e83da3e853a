"""`tokaccel eval`: run long-context tasks for one or more policies and print the summary table.

    tokaccel eval --model gemma3-270m --policies dense,tokenselect:k=1024 --tasks niah_single,niah_multikey,vt
                  --lengths 2048,8192,32768 --samples 20 --out results/
    tokaccel eval --quick                    # SmolLM2, passkey/NIAH at 1K-2K, 5 samples
    tokaccel eval --quick --tiny             # CI smoke: 256 tokens, 2 samples
    tokaccel eval --tasks ppl:eval_len=256 --policies dense,none --lengths 4k
    tokaccel eval --policies dense,kvpress:snapkv@0.5          # a kvpress press next to tokaccel (pip install kvpress)
    tokaccel eval --tasks longbench:hotpotqa,infbench:passkey --longbench-dir DIR --infbench-dir DIR
    tokaccel eval --report results/          # task x length tables of the results already there
    tokaccel eval --report results/ --against tokenselect --margin 3   # paired differences on the same prompts
    tokaccel eval --engine vllm --policies dense,quest:k=768,page=32 --tasks passkey --lengths 2048
                                             # the same prompts through vLLM (./run.sh vllm-setup first)
"""

from __future__ import annotations

import argparse
import re
import sys


def _lengths(text: str) -> list[int]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)([kK]?)", part)
        if not match:
            raise argparse.ArgumentTypeError(f"bad length {part!r}: use integers like 2048 or 8k")
        out.append(int(match.group(1)) * (1024 if match.group(2) else 1))
    return out


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("eval", help="long-context evals (RULER-style tasks, LongBench, InfiniteBench, perplexity)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="embedded name (smollm2-135m-instruct, gemma3-270m), HF id or path; "
                   "several comma-separated (default: smollm2-135m-instruct)")
    p.add_argument("--policies", action="append", default=None,
                   help='policy specs, comma-separated: "dense,tokenselect:k=1024,theta=0.9", "none" (unpatched), '
                        '"kvpress:snapkv@0.5" (needs kvpress). Default: dense')
    p.add_argument("--tasks", action="append", default=None, help="tasks, comma-separated (see --list-tasks)")
    p.add_argument("--lengths", type=_lengths, default=None, help="prompt lengths in tokens, e.g. 2048,8k,32k")
    p.add_argument("--samples", type=int, default=None, help="samples per (task, length) (default 10; --quick 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results folder (default results/, --quick results/quick)")
    p.add_argument("--quick", action="store_true", help="the quick suite (<= 10 min on a 2-core CPU with dense)")
    p.add_argument("--tiny", action="store_true", help="with --quick: tiny sizes for a CI smoke test")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None, help="force the chat template")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="plain completion even if a chat template exists")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="hf (default): transformers in this process; vllm: a vLLM engine (CPU) in the vLLM environment "
                        "of ./run.sh vllm-setup ($TOKACCEL_VLLM_VENV), one per policy, on the same prompt token ids. "
                        "vllm runs the embedded smollm2 or a local model folder, policies dense (vLLM's own attention), "
                        "tokenselect:... and quest:... (page=32: whole cache blocks); its results are kept apart "
                        "(label suffix ' (vllm)')")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, auto (default)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per prefill forward (0: whole prompt)")
    p.add_argument("--question-in-prefill", action="store_true",
                   help="prefill each whole prompt (context + question) in one go instead of the context once for all "
                        "its questions: a policy that compresses at prefill (snapkv, h2o) then sees the question")
    p.add_argument("--longbench-dir", default=None, help="folder with LongBench's <dataset>.jsonl files")
    p.add_argument("--infbench-dir", default=None, help="folder with InfiniteBench's <task>.jsonl files")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--force", action="store_true", help="recompute results whose folder exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list-tasks", action="store_true", help="list the tasks and exit")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="print a task x length table per (model, policy) of the results under DIR and exit")
    p.add_argument("--by-budget", action="store_true",
                   help="with --report: tables per share of the prompt kept / read (eviction vs selection at equal "
                        "budget) and the plots DIR/plots/<model>_accuracy_at_equal_budget.png (vs length) and "
                        "<model>_accuracy_vs_budget.png (where a cell has two or more budgets)")
    p.add_argument("--against", metavar="SPEC", default=None,
                   help='with --report: every result paired, row by row on the same prompts, with the result of SPEC '
                        '("tokenselect", "tokenselect:pool=15", "dense") at the same budget: difference, 95 %% interval '
                        'and verdict at --margin')
    p.add_argument("--margin", type=float, default=3.0, help="with --against: the margin in points (default 3)")
    p.set_defaults(func=run)


def _list_tasks() -> int:
    from .loaders import INFBENCH, LONGBENCH_PROMPTS
    from .tasks import ALIASES, SYNTHETIC

    for name, task in sorted(SYNTHETIC.items()):
        print(f"{name:22s} {task.description} [{task.metric}]")
    for alias, target in sorted(ALIASES.items()):
        print(f"{alias:22s} = {target}")
    print("longbench:<dataset>    " + ", ".join(sorted(LONGBENCH_PROMPTS)))
    print("infbench:<task>        " + ", ".join(sorted(INFBENCH)))
    return 0


def _specs(values: list[str] | None) -> list[str] | None:
    from ..registry import split_specs

    if not values:
        return None
    return [spec for value in values for spec in split_specs(value)]


def run(args) -> int:
    if args.list_tasks:
        return _list_tasks()
    if args.report:
        from .runner import collect_results, length_tables

        results = collect_results(args.report)
        if not results:
            print(f"tokaccel eval: no results under {args.report}", file=sys.stderr)
            return 2
        if args.against:
            from .paired import paired_comparisons, paired_table

            if args.margin <= 0:
                print(f"tokaccel eval: --margin must be > 0, got {args.margin:g}", file=sys.stderr)
                return 2
            comparisons = paired_comparisons(results, args.against, args.margin)
            if not comparisons:
                print(f"tokaccel eval: no result under {args.report} pairs with {args.against!r} (same prompts and "
                      "budget; the reference is matched by its label without k / n_init / n_local / budget)", file=sys.stderr)
                return 2
            print(paired_table(comparisons, args.margin), end="")
            return 0
        if args.by_budget:
            from .budgets import budget_tables, plot_budgets, plot_vs_budget

            print(budget_tables(results), end="")
            for path in plot_budgets(args.report) + plot_vs_budget(args.report):
                print(f"wrote {path}")
            return 0
        print(length_tables(results), end="")
        return 0
    from .runner import QUICK, TINY, run_eval, summary_table, write_folder_summary

    if args.tiny and not args.quick:
        print("--tiny only goes with --quick", file=sys.stderr)
        return 2
    suite = (TINY if args.tiny else QUICK) if args.quick else {}
    policies = _specs(args.policies) or ["dense"]
    if args.quick and "dense" not in policies:
        policies = ["dense"] + policies  # the quick suite always shows dense next to what it compares
    models = [m for m in (args.model or suite.get("model", "smollm2-135m-instruct")).split(",") if m.strip()]
    tasks = _specs(args.tasks) or suite.get("tasks") or ["passkey", "niah_single"]
    lengths = args.lengths or suite.get("lengths") or [1024, 2048]
    samples = args.samples or suite.get("samples") or 10
    out = args.out or ("results/quick" if args.quick else "results")
    data_dirs = {k: v for k, v in (("longbench", args.longbench_dir), ("infbench", args.infbench_dir)) if v}
    results = []
    try:
        for model in models:
            results += run_eval(model.strip(), policies=policies, tasks=tasks, lengths=lengths, samples=samples, out=out,
                                seed=args.seed, chat=args.chat, dtype=args.dtype, device=args.device,
                                prefill_chunk=args.prefill_chunk or None, data_dirs=data_dirs, force=args.force,
                                progress=not args.no_progress, write_summary=False, threads=args.threads,
                                reuse_context=not args.question_in_prefill, engine=args.engine)
    except (ValueError, FileNotFoundError, ImportError, NotImplementedError) as e:
        print(f"tokaccel eval: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if args.engine == "hf":
            raise
        print(f"tokaccel eval: {e}", file=sys.stderr)  # the vLLM run failed: the end of its log
        return 1
    if results:
        write_folder_summary(out)
    print(summary_table(results), end="")
    print(f"\nresults in {out}/ (summary.md: every result there; `tokaccel plot {out}` draws the plots)")
    return 0
