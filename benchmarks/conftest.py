"""pytest-benchmark suites over the same functions as `tokaccel bench`.

Collected only with `--benchmark-only` (pytest-benchmark installed), so a plain `pytest` run
never times anything:

    pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only --benchmark-json results/bench/pytest_benchmark.json
"""

import pytest


def pytest_ignore_collect(collection_path, config):
    try:
        return not config.getoption("benchmark_only")
    except ValueError:  # pytest-benchmark not installed
        return True


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, fp32, CPU."""
    from tokaccel import models

    return models.load("smollm2-135m-instruct")
