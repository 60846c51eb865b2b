"""Fixtures of the LoRA tests: one tiny random Llama and its ModelConfig."""

from __future__ import annotations

import pytest
from transformers import LlamaForCausalLM

from slora.config import ModelConfig
from tests.reference.peft import make_tiny_llama, model_config_of


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_model_config(tiny_llama) -> ModelConfig:
    return model_config_of(tiny_llama)
