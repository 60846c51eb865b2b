"""Oracles from Hugging Face transformers: greedy generation and logits of a model (`slora.fixtures` builds them)."""

from __future__ import annotations

import torch
@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of one prompt with HF's own KV cache, stopping at the config's EOS."""
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=model.config.eos_token_id, pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def hf_last_logits(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt])).logits[0, -1]
