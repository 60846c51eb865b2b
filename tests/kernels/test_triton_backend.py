"""`LLM(..., backend="triton")` gives the torch backend's greedy tokens for a batch of mixed adapters."""

from __future__ import annotations

import pytest

from slora import LLM, SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def test_triton_backend_matches_torch_backend(model_and_adapters, device, monkeypatch):
    from slora.kernels import triton_attention, triton_lora

    folder, adapters = model_and_adapters
    calls = {"lora": 0, "attention": 0}

    def counted(function, key):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(triton_lora.TritonLoRA, "start", counted(triton_lora.TritonLoRA.start, "lora"))
    monkeypatch.setattr(triton_attention, "attend_pool", counted(triton_attention.attend_pool, "attention"))
    # Two prompts share an adapter (a segment of two sequences), one has none, ranks differ.
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16], [17, 18], [19, 20, 21]]
    names = ["r2", "r8", None, "r16", "r8"]
    results = {}
    for backend in ("torch", "triton"):
        # A small token budget splits the first prompts' prefill into chunks (a prefix in the pool).
        llm = LLM(model=str(folder), device=str(device), dtype="float32", backend=backend, adapters=adapters,
                  max_num_batched_tokens=8, num_slots=512)
        results[backend] = [o.token_ids for o in llm.generate(prompts, PARAMS, adapters=names)]
    assert results["triton"] == results["torch"]
    assert calls["lora"] > 0 and calls["attention"] > 0  # the Triton run did run the Triton kernels
    assert all(len(tokens) == PARAMS.max_tokens for tokens in results["triton"])


def test_unknown_backend_is_refused(model_and_adapters):
    with pytest.raises(ValueError, match="backend"):
        LLM(model=str(model_and_adapters[0]), backend="cuda")
