"""Fixtures of the LoRA tests: one tiny random Llama and its architecture spec."""

from __future__ import annotations

import pytest
from transformers import LlamaForCausalLM

from slora.architecture import ArchitectureSpec
from tests.reference.peft import arch_of, make_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_arch(tiny_llama) -> ArchitectureSpec:
    return arch_of(tiny_llama)
