"""Shared fixtures: the real embedded models (loaded once per session). Helpers that tests import
(tiny random models, ...) live in tests/support/testkit."""

import pytest

import tokaccel
from tokaccel import models


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, fp32, CPU."""
    return models.load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3():
    """(model, tokenizer) of Gemma-3-270M, fp32, CPU."""
    return models.load("gemma3-270m")


@pytest.fixture(autouse=True)
def _never_leave_a_model_patched(request):
    """A test that fails mid-way must not leave a shared session model patched."""
    yield
    for name in ("smollm2", "gemma3"):
        if name in request.fixturenames:
            model = request.getfixturevalue(name)[0]
            if tokaccel.get_policy(model) is not None:
                tokaccel.unpatch_model(model)
