"""Mixed-adapter batches against HF PEFT: six adapters of different ranks and targets plus base requests."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from slora import LLM, SamplingParams
from slora.engine.batch import build_forward_batch
from slora.models.loader import default_model_path
from tests.reference.hf import hf_greedy, hf_last_logits
from tests.reference.peft import make_peft_adapter

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "r1-attention": dict(r=1, lora_alpha=2, target_modules=ATTENTION),
    "r4-mlp": dict(r=4, lora_alpha=16, target_modules=MLP),
    "r8-all": dict(r=8, lora_alpha=8, target_modules="all-linear"),
    "r16-qv-rslora": dict(r=16, lora_alpha=32, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    "r32-all": dict(r=32, lora_alpha=16, target_modules="all-linear"),
    "r64-patterns": dict(r=64, lora_alpha=64, target_modules=["q_proj", "o_proj", "down_proj"],
                         rank_pattern={"o_proj": 8}, alpha_pattern={"down_proj": 32}),
}


def _mixed_batch(prompts: list[list[int]]) -> list[str | None]:
    """Each adapter twice and the base model twice, interleaved."""
    names = list(ADAPTERS) + [None]
    return [names[i % len(names)] for i in range(len(prompts))]


def _peft_models(base, folders):
    return {name: PeftModel.from_pretrained(copy.deepcopy(base), folder).eval() for name, folder in folders.items()} | {
        None: base}


def _check_against_peft(llm: LLM, references, prompts, adapters, max_tokens: int):
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), adapters=adapters)
    for prompt, adapter, output in zip(prompts, adapters, outputs):
        assert output.error is None, output.error
        assert output.token_ids == hf_greedy(references[adapter], prompt, max_tokens), f"adapter {adapter}"
    engine = llm.engine
    request_ids = [engine.add_request(p, SamplingParams(max_tokens=1), adapter=a) for p, a in zip(prompts, adapters)]
    scheduled = engine.scheduler.schedule()
    assert len(scheduled) == len(prompts)  # all adapters and base requests in one batch
    batch, _ = build_forward_batch(scheduled, engine.pool.layers, engine.arch, engine.backend, engine.residency)
    logits = engine.model(batch)
    for row, prompt, adapter in zip(logits, prompts, adapters):
        expected = hf_last_logits(references[adapter], prompt)
        torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    for request_id in request_ids:
        engine.abort(request_id)


@pytest.fixture(scope="module")
def tiny_with_adapters(tiny_llama_folder, tmp_path_factory):
    base, folder = tiny_llama_folder
    root = tmp_path_factory.mktemp("adapters")
    folders = {name: make_peft_adapter(root, name, base, seed=i, **kw) for i, (name, kw) in enumerate(ADAPTERS.items())}
    return base, folder, folders


def test_tiny_llama_mixed_batch_equals_peft(tiny_with_adapters):
    base, folder, folders = tiny_with_adapters
    llm = LLM(model=str(folder), adapters={k: str(v) for k, v in folders.items()}, max_num_batched_tokens=4096)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 320) for _ in range(rng.randint(1, 60))] for _ in range(14)]
    _check_against_peft(llm, _peft_models(base, folders), prompts, _mixed_batch(prompts), max_tokens=10)


def test_default_model_mixed_batch_equals_peft(default_llm, tmp_path):
    path = default_model_path()
    base = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    folders = {name: make_peft_adapter(tmp_path, name, base, seed=i, **kw) for i, (name, kw) in enumerate(ADAPTERS.items())}
    for name, folder in folders.items():
        default_llm.add_adapter(name, str(folder))
    try:
        questions = ["What is the capital of France?", "Name a red fruit.", "Hi!", "Why is the sky blue?",
                     "Tell me a joke.", "What is 2+2?", "List two planets."]
        prompts = [default_llm.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
        _check_against_peft(default_llm, _peft_models(base, folders), prompts, _mixed_batch(prompts), max_tokens=6)
    finally:
        for name in folders:
            default_llm.remove_adapter(name)
