"""Fixtures shared across test modules."""

import pytest


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """One model cache for the tests that run the real demos: SmolLM2's GGUF is converted once per session."""
    return tmp_path_factory.mktemp("smollm2-cache")
