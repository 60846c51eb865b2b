"""Oracles from Hugging Face transformers: tiny random models saved as folders, greedy generation."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

TINY_CONFIGS = {
    # GQA 4:2, untied embeddings, Llama 3.1 rope scaling.
    "llama": lambda: LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        bos_token_id=1, eos_token_id=2,
    ),
    # q/k/v bias, tied embeddings, GQA 4:1.
    "qwen2": lambda: Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=1024, initializer_range=0.2, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ),
    "mistral": lambda: MistralConfig(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2, sliding_window=None,
        bos_token_id=1, eos_token_id=2,
    ),
}


def make_tiny_model(kind: str, folder: Path, seed: int = 0) -> torch.nn.Module:
    """A random tiny HF model of `kind`, saved to `folder` (config.json + safetensors)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[kind](), dtype=torch.float32).eval()
    if getattr(model.model.layers[0].self_attn.q_proj, "bias", None) is not None:
        with torch.no_grad():  # HF initialises biases to zero: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return model


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
