"""Runs grouped_scores Triton-vs-reference cases; meant for a process with TRITON_INTERPRET=1.

Usage: python interp_worker.py CASES.json RESULTS.json  (the test module drives it).
Triton reads TRITON_INTERPRET when `triton` is imported, so the interpreter comparisons
run in their own process; `run_cases` can also be called in-process when pytest itself
was started with TRITON_INTERPRET=1.
"""


def run_cases(cases):
    import torch

    from tokaccel.kernels.ops import grouped_scores, grouped_scores_reference, interpret_enabled, resolve_backend
    from tokaccel.kernels._grouped_scores_triton import choose_config, grouped_scores_triton
    from tokaccel.kernels.testing import assert_close, make_qk, run_each

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

    def check(c):
        dtype = dtypes[c["dtype"]]
        q, k = make_qk(c["B"], c["H"], c["Hk"], c["N"], c["D"], dtype, seed=c.get("seed", 0),
                       layout=c.get("layout", "contiguous"))
        scale = c.get("scale")
        if c.get("path") is None:
            res = grouped_scores(q, k, scale, backend="triton")
        else:
            cfg = choose_config(c["H"] // c["Hk"], c["D"], dtype, use_dot=c["path"] == "dot")
            res = grouped_scores_triton(q, k, scale, config=cfg)
        ref = grouped_scores_reference(q, k, scale)
        # Both sides accumulate exactly representable products in fp32: compare at fp32 tolerance.
        assert_close(res, ref, dtype=torch.float32, name=c["id"])
        if res.dtype != torch.float32 or tuple(res.shape) != (c["B"], c["H"], c["N"]):
            raise AssertionError(f"bad output {res.dtype} {tuple(res.shape)}")

    return {
        "interpret_enabled": interpret_enabled(),
        "auto_backend_cpu": resolve_backend(None, [torch.zeros(1)]),
        "cases": run_each(cases, check),
    }


if __name__ == "__main__":
    from tokaccel.kernels.testing import worker_main

    worker_main(run_cases)
