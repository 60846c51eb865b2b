"""slora's Llama-family model against Hugging Face transformers on tiny random models."""

from __future__ import annotations

import random

import pytest
import torch

from slora import LLM, SamplingParams
from slora.engine.batch import build_forward_batch
from slora.fixtures import tiny_model
from tests.reference.hf import hf_greedy, hf_last_logits

LENGTHS = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 120, 150, 200, 233, 270, 300]


def _prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in LENGTHS]


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, tiny_model(request.param, folder), folder


def test_batched_greedy_tokens_equal_transformers(tiny):
    kind, hf_model, folder = tiny
    llm = LLM(model=str(folder), max_num_batched_tokens=4096)
    prompts = _prompts(hf_model.config.vocab_size)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    for prompt, output in zip(prompts, outputs):
        assert output.token_ids == hf_greedy(hf_model, prompt, 12), f"{kind}, prompt of {len(prompt)} tokens"


def test_last_position_logits_match_transformers(tiny):
    kind, hf_model, folder = tiny
    llm = LLM(model=str(folder), max_num_batched_tokens=4096)
    engine = llm.engine
    prompts = _prompts(hf_model.config.vocab_size, seed=2)
    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1))
    scheduled = engine.scheduler.schedule()
    assert len(scheduled) == len(prompts)  # one batch, every prompt prefilled together
    batch, sampling = build_forward_batch(scheduled, engine.pool.layers, engine.arch, engine.backend)
    logits = engine.model(batch)
    assert sampling == list(range(len(prompts)))
    for row, prompt in zip(logits, prompts):
        expected = hf_last_logits(hf_model, prompt)
        torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_chunked_prefill_gives_the_same_tokens(tiny):
    kind, hf_model, folder = tiny
    prompts = _prompts(hf_model.config.vocab_size, seed=3)[-4:]
    chunked = LLM(model=str(folder), max_num_batched_tokens=64).generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    for prompt, output in zip(prompts, chunked):
        assert output.token_ids == hf_greedy(hf_model, prompt, 6)
