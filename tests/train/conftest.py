"""Fixtures of the training tests."""

import pytest

from longseq.errors import LongseqError
from longseq.models.loader import default_model_path
from longseq.models.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def tok():
    """The built-in model's tokenizer (skipped where its package is missing)."""
    try:
        return load_tokenizer(default_model_path())
    except LongseqError as e:
        pytest.skip(str(e))
