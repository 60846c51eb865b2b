"""PEFT oracles: tiny random Llamas and adapters saved by PEFT itself, with random B (not zero)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from slora.config import ModelConfig


def make_tiny_llama(hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def model_config_of(base_model: LlamaForCausalLM) -> ModelConfig:
    return ModelConfig.from_hf(base_model.config.to_dict())


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


def write_lora_folder(folder: Path, num_layers: int, shapes: dict[str, tuple[int, int]], rank: int,
                      targets: list[str], alpha: float, seed: int) -> Path:
    """Write a random adapter in PEFT's on-disk format (config + safetensors names) without PEFT.

    For tests that need thousands of adapters: PEFT's own save path is covered by the other helpers.
    """
    import json

    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for module in targets:
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            in_features, out_features = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.2
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.2
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets, "bias": "none",
              "task_type": "CAUSAL_LM", "use_rslora": False, "use_dora": False, "modules_to_save": None}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder
