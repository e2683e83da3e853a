"""What does a forward of M tokens cost on this CPU, with nn.Linear as is and with packed weights?

A speculative verify forward feeds 2-80 tokens where decoding feeds one; if the M-token forward
costs about what the 1-token one costs, every accepted draft token is nearly free. This times,
interleaved, (1) each linear shape of SmolLM2-135M with `F.linear` and with the oneDNN-packed
weight of `tokaccel.cpu_linear`, and (2) the whole SmolLM2 forward of M tokens after a 200-token
cache, a plain and a packed copy of the model, all sizes interleaved round by round (the packed
model's logits are checked against the plain ones).

Run: python benchmarks/packed_linear.py [--rows 1,4,8,16,32,81 --repeats 15 --threads 2 --no-model]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tokaccel.cpu_linear import PACK_ROWS

SHAPES = {"q/o proj": (576, 576), "k/v proj": (192, 576), "gate/up": (1536, 576), "down": (576, 1536),
          "lm_head": (49152, 576)}  # SmolLM2-135M (out_features, in_features)


def median_ms(fns: dict, repeats: int) -> dict:
    """Median wall ms of each callable, the callables interleaved round by round."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def linear_table(rows: list[int], repeats: int) -> None:
    print("| linear (out, in) | rows | F.linear ms | packed ms | packed speedup |\n|---|---|---|---|---|")
    for label, (out_f, in_f) in SHAPES.items():
        weight = torch.randn(out_f, in_f)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        for m in rows:
            x = torch.randn(1, m, in_f)
            r = median_ms({"plain": lambda: F.linear(x, weight),
                           "packed": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")},
                          repeats)
            print(f"| {label} {out_f}x{in_f} | {m} | {r['plain']:.3f} | {r['packed']:.3f} | "
                  f"{r['plain'] / r['packed']:.2f} |")


def model_table(rows: list[int], repeats: int) -> None:
    from transformers import DynamicCache

    from tokaccel import models
    from tokaccel.cpu_linear import pack_linears

    variants = {"plain": models.load("smollm2-135m-instruct")[0], "packed": models.load("smollm2-135m-instruct")[0]}
    start = time.perf_counter()
    pack_linears(variants["packed"])
    print(f"\npacking SmolLM2's linears took {time.perf_counter() - start:.2f} s")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 20000, (1, 200), generator=gen)
    caches = {kind: DynamicCache(config=model.config) for kind, model in variants.items()}
    with torch.inference_mode():
        for kind, model in variants.items():
            model(prompt, cache=caches[kind])
        print("\n| SmolLM2 forward | tokens | plain ms | packed ms | plain / 1-token plain | "
              "packed / 1-token packed | packed speedup |\n|---|---|---|---|---|---|---|")
        inputs = {m: (torch.randint(100, 20000, (1, m), generator=gen), torch.arange(200, 200 + m)[None]) for m in rows}
        times = {(m, kind): [] for m in rows for kind in variants}
        for round_ in range(repeats + 1):  # rows and variants interleaved; round 0 warms up
            for m, (ids, pos) in inputs.items():
                logits = {}
                for kind, model in variants.items():
                    start = time.perf_counter()
                    logits[kind] = model(ids, cache=caches[kind], position_ids=pos).logits
                    if round_:
                        times[(m, kind)].append(time.perf_counter() - start)
                    caches[kind].crop(-m)
                torch.testing.assert_close(logits["packed"], logits["plain"], rtol=1e-4, atol=1e-4)
        ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
        for m in rows:
            plain, packed = ms[(m, "plain")], ms[(m, "packed")]
            print(f"| | {m} | {plain:.1f} | {packed:.1f} | {plain / ms[(rows[0], 'plain')]:.2f} | "
                  f"{packed / ms[(rows[0], 'packed')]:.2f} | {plain / packed:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,8,16,32,81")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-model", action="store_true", help="only the per-linear table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"median ms of {args.repeats} interleaved runs, {args.threads} thread(s), fp32, packed for "
          f"{PACK_ROWS} rows")
    linear_table(rows, args.repeats)
    if not args.no_model:
        model_table(rows, args.repeats)


if __name__ == "__main__":
    main()
