"""Shared fixtures: tiny random models saved as HF folders, and the default model loaded once."""

from __future__ import annotations

import pytest

from tests.reference.hf import make_tiny_model


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory):
    """(HF model, folder) of a tiny random Llama with GQA."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return make_tiny_model("llama", folder), folder


@pytest.fixture(scope="session")
def default_llm():
    from slora import LLM

    return LLM(max_num_batched_tokens=4096)
