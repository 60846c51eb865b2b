"""Shared fixtures: tiny random models saved as HF folders, and the default model loaded once."""

from __future__ import annotations

import pytest
import torch

from slora.fixtures import tiny_model

# Test shapes are tiny: one intra-op thread is faster than handing each small op to two, and keeps
# the suite's time steady when the machine is busy with something else.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory):
    """(HF model, folder) of a tiny random Llama with GQA."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return tiny_model("llama", folder), folder


@pytest.fixture(scope="session")
def tiny_llama_arch(tiny_llama_folder):
    """The architecture spec of `tiny_llama_folder`'s model."""
    from slora.models.loader import read_architecture

    return read_architecture(tiny_llama_folder[1])


@pytest.fixture(scope="session")
def default_llm():
    from slora import LLM

    return LLM(max_num_batched_tokens=4096)
