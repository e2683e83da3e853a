"""Latency and memory measurement, used by `tokaccel bench` and by benchmarks/.

- `timing`: CPU / CUDA timers (interleaved, median + min/max), copy bandwidth, peak memory.
- `ops`: op-level attention steps on random K/V; the op-bench plugin registry for policies.
- `e2e`: `generate()` end to end: TTFT, TPOT, tokens/s, peak memory, KV bytes.
- `results`: CSV rows with device, versions, git commit and timestamp; markdown tables.
- `plots`: latency-vs-context and speedup PNGs from the CSVs (`tokaccel plot`).
- `cli`: the `bench ops` / `bench e2e` commands.

Nothing is imported here, so `import tokaccel` stays light.
"""
