"""Fixtures for the engine tests."""

import pytest

from longseq.engine import LLM
from longseq.models.loader import LoadedModel


@pytest.fixture(scope="session")
def default_llm() -> LLM:
    """The real default model (SmolLM2-135M-Instruct), float32 on CPU, loaded once for every engine test."""
    return LLM(None, device="cpu", dtype="float32", num_kv_blocks=256)


@pytest.fixture(scope="session")
def default_lm(default_llm) -> LoadedModel:
    return default_llm.engine.lm
