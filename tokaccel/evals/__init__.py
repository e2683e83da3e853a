"""Long-context evals: task generators, scorers, dataset loaders, runner, perplexity, plots.

    from tokaccel.evals import run_eval, QUICK
    run_eval("smollm2-135m-instruct", policies=["dense"], tasks=["passkey", "niah_single"],
             lengths=[1024, 2048], samples=5, out="results")

Command line: `tokaccel eval ...` and `tokaccel plot RESULTS` (see tokaccel/evals/cli.py).
"""

from .metrics import METRICS, score
from .perplexity import compare_perplexity, perplexity, perplexity_ids
from .plots import plot_results
from .runner import QUICK, TINY, collect_results, evaluate, make_method, run_eval, summary_table
from .samples import PromptFormat, Question, Sample, Task
from .tasks import SYNTHETIC, get_task, make_samples, task_names

__all__ = [
    "run_eval", "QUICK", "TINY", "evaluate", "make_method", "collect_results", "summary_table",
    "make_samples", "get_task", "task_names", "SYNTHETIC", "Task", "Sample", "Question", "PromptFormat",
    "perplexity", "perplexity_ids", "compare_perplexity", "score", "METRICS", "plot_results",
]
