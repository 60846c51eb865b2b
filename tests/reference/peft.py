"""PEFT oracles: adapters saved by PEFT itself, with random B (not zero), on tiny random Llamas."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from slora.architecture import ArchitectureSpec
from slora.config import ModelConfig
from slora.fixtures import tiny_model
from slora.models.loader import architecture_spec


def make_tiny_llama(hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    return tiny_model("plain", seed=seed, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers)


def model_config_of(base_model: LlamaForCausalLM) -> ModelConfig:
    return ModelConfig.from_hf(base_model.config.to_dict())


def arch_of(base_model: LlamaForCausalLM) -> ArchitectureSpec:
    return architecture_spec(model_config_of(base_model))


def make_peft_model(base_model: LlamaForCausalLM, seed: int = 0, **lora_kwargs) -> PeftModel:
    """PEFT LoRA on a copy of `base_model`, with lora_B random too (PEFT initialises it to zero)."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base_model), LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    return peft_model


def make_peft_adapter(tmp_path: Path, name: str, base_model: LlamaForCausalLM, seed: int = 0,
                      **lora_kwargs) -> Path:
    """Save a random PEFT LoRA adapter of `base_model` to `tmp_path / name`; returns the folder."""
    folder = tmp_path / name
    make_peft_model(base_model, seed=seed, **lora_kwargs).save_pretrained(folder)
    return folder
