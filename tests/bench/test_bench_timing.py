"""Timers: interleaving, statistics, copy bandwidth, peak memory. No timed assertions."""

import torch

from tokaccel.bench.timing import PeakMemory, Timing, copy_bandwidth, paired_ratio, time_fn, time_interleaved


def test_interleaving_runs_baseline_and_candidate_equally_often_and_rotates():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("base", "cand", "other")}
    timings = time_interleaved(fns, warmup=2, repeats=5)
    assert calls.count("base") == calls.count("cand") == calls.count("other") == 7
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert all(sorted(r) == ["base", "cand", "other"] for r in rounds)  # one call of each per repeat
    assert {r[0] for r in rounds} == {"base", "cand", "other"}  # the order rotates
    for timing in timings.values():
        assert timing.repeats == len(timing.samples) == 5 and timing.warmup == 2
        assert timing.min_s <= timing.median_s <= timing.max_s
        assert timing.threads == torch.get_num_threads() and timing.method == "cpu-perf_counter"


def test_time_fn_cpu():
    timing = time_fn(lambda: torch.ones(10).sum(), warmup=1, repeats=3)
    assert timing.repeats == 3 and timing.median_s > 0


def test_paired_ratio_is_the_median_of_per_repeat_ratios():
    base = Timing.from_samples([2.0, 4.0, 8.0], 0, "x")
    cand = Timing.from_samples([1.0, 1.0, 8.0], 0, "x")
    assert paired_ratio(base, cand) == 2.0  # ratios 2, 4, 1 -> median 2 (the ratio of medians would be 4)
    unpaired = Timing.from_samples([1.0, 2.0], 0, "x")
    assert paired_ratio(base, unpaired) == 4.0 / 1.5


def test_copy_bandwidth_is_positive():
    assert copy_bandwidth("cpu", nbytes=4 * 2**20, repeats=3) > 0


def test_peak_memory_sees_an_allocation_held_in_the_block():
    with PeakMemory("cpu") as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert memory.peak_delta > 32 * 2**20
    del block
