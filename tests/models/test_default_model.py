"""The embedded default model (SmolLM2-135M-Instruct from GGUF) against transformers, and the CLI."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from slora import SamplingParams
from slora.cli import main
from slora.models.loader import default_model_path
from tests.reference.hf import hf_greedy

QUESTIONS = [
    "What is the capital of France?", "Name a red fruit.", "How many legs does a spider have?", "Hi!",
    "Write a haiku about the sea.", "What is 12 times 12?", "Translate 'good morning' to Spanish.",
    "Who wrote Romeo and Juliet?", "Give me three colors.", "What is photosynthesis? Explain in detail, "
    "step by step, for a student who has never studied biology, using simple words and an example. " * 3,
    "Why is the sky blue?", "Tell me a joke.", "What is the boiling point of water?", "日本の首都は？",
    "List two planets.", "What does a CPU do?",
]


@pytest.fixture(scope="module")
def hf_model():
    # transformers reads the same GGUF file itself: an oracle independent of slora's loader and model.
    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_chat_greedy_tokens_equal_transformers_in_one_batch(default_llm, hf_model):
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outputs = default_llm.chat(conversations, SamplingParams(temperature=0, max_tokens=16))
    for conversation, output in zip(conversations, outputs):
        prompt = default_llm.apply_chat_template(conversation)
        assert output.token_ids == hf_greedy(hf_model, prompt, 16), conversation[0]["content"]


def test_cli_answers_paris(capsys):
    assert main(["generate", "--chat", "--max-tokens", "20", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out
