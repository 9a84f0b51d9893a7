"""The real SmolLM2-135M-Instruct teacher, loaded once per test module."""

import pytest

from alambic.config import ModelConfig
from alambic.models import load_model, load_tokenizer

TEACHER = ModelConfig(model="smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="module")
def teacher():
    return load_model(TEACHER, cache=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TEACHER)
