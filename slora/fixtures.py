"""Random models and adapters, built offline: what tests, benchmarks and scripts run on.

- `tiny_model(kind, folder)`: a tiny random Hugging Face model (`TINY_MODELS`), saved as a folder
  (config.json + safetensors, and a tokenizer when one is given); `tiny_chat_model`: one with the
  default model's tokenizer and chat template;
- `write_adapter(folder, arch, rank, targets)`: a random LoRA adapter in PEFT's on-disk format
  (adapter_config.json + adapter_model.safetensors, PEFT's tensor names), written directly, which
  is fast enough for thousands; `adapter_tensors` is its tensors alone, for adapters made wrong on
  purpose. Adapters saved by PEFT itself are the tests' oracle (`tests/reference/peft.py`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from slora.architecture import ArchitectureSpec

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1, eos_token_id=2)
# kind -> (transformers config class, its arguments). Each covers what the others do not.
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    # GQA 4:2, untied embeddings, Llama 3.1 rope scaling.
    "llama": ("LlamaConfig", _SMALL | dict(vocab_size=320, intermediate_size=160, num_key_value_heads=2,
                                           max_position_embeddings=1024, initializer_range=0.2,
                                           tie_word_embeddings=False, rope_parameters=_LLAMA3_ROPE)),
    # q/k/v bias, tied embeddings, GQA 4:1.
    "qwen2": ("Qwen2Config", _SMALL | dict(vocab_size=320, intermediate_size=160, num_key_value_heads=1,
                                           max_position_embeddings=1024, initializer_range=0.2,
                                           tie_word_embeddings=True)),
    "mistral": ("MistralConfig", _SMALL | dict(vocab_size=320, intermediate_size=160, num_attention_heads=8,
                                               num_key_value_heads=2, max_position_embeddings=1024,
                                               initializer_range=0.2, sliding_window=None)),
    # transformers' default initialisation and rope: the base of the PEFT comparisons.
    "plain": ("LlamaConfig", _SMALL | dict(vocab_size=128, intermediate_size=128, num_key_value_heads=2)),
    # a tokenizer's vocabulary (given to `tiny_model`): chat templates, detokenization, the server.
    "chat": ("LlamaConfig", _SMALL | dict(intermediate_size=128, num_key_value_heads=2, max_position_embeddings=4096,
                                          initializer_range=0.2, tie_word_embeddings=False)),
}


def tiny_model(kind: str, folder: Path | None = None, seed: int = 0, tokenizer=None, **overrides) -> torch.nn.Module:
    """A random tiny HF model of `kind` (float32, eval mode), saved to `folder` if given. With a
    tokenizer, the vocabulary and special tokens are the tokenizer's, and it is saved alongside."""
    import transformers

    config_class, arguments = TINY_MODELS[kind]
    arguments = arguments | overrides
    if tokenizer is not None:
        arguments |= dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**arguments)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if getattr(model.model.layers[0].self_attn.q_proj, "bias", None) is not None:
        with torch.no_grad():  # HF initialises biases to zero: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.2)
    if folder is not None:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    return model


def tiny_chat_model(folder: Path, seed: int = 0) -> torch.nn.Module:
    """A tiny random Llama with the default model's tokenizer and chat template, saved to `folder`."""
    from transformers import AutoTokenizer

    from slora.models.loader import default_model_path, gguf_to_hf_folder

    tokenizer = AutoTokenizer.from_pretrained(gguf_to_hf_folder(default_model_path()))
    return tiny_model("chat", folder, seed, tokenizer)


def adapter_tensors(arch: ArchitectureSpec, rank: int, targets: Sequence[str], seed: int = 0,
                    a_scale: float | None = 0.2, b_scale: float = 0.2, dtype: torch.dtype = torch.float32,
                    shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """Random A `[rank, in]` and B `[out, rank]` of every layer's `targets`, under PEFT's names.
    A ~ N(0, a_scale^2) (`a_scale` None: 1/in, which keeps the delta small next to a dummy base
    output), B ~ N(0, b_scale^2); `shapes` replaces the architecture's (in, out) features."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(arch.num_layers):
        for module in targets:
            in_features, out_features = (shapes or {}).get(module) or arch.shape(module)
            prefix = f"base_model.model.{arch.module_path(layer, module)}"
            scale = in_features**-0.5 if a_scale is None else a_scale
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_features, generator=generator) * scale).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_features, rank, generator=generator)
                                                  * b_scale).to(dtype)
    return tensors


def write_adapter(folder: Path, arch: ArchitectureSpec, rank: int = 4, targets: Sequence[str] = ("q_proj", "v_proj"),
                  seed: int = 0, *, alpha: float | None = None, config: dict[str, Any] | None = None,
                  tensors: dict[str, torch.Tensor] | None = None, **scales) -> Path:
    """A random adapter folder in PEFT's format; `config` overrides entries of adapter_config.json,
    `tensors` replaces the random ones, `scales` go to `adapter_tensors` (a_scale, b_scale, dtype)."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank if alpha is None else alpha,
                "target_modules": list(targets), "bias": "none", "task_type": "CAUSAL_LM", "use_rslora": False,
                "use_dora": False, "modules_to_save": None, "lora_dropout": 0.0}
    (folder / "adapter_config.json").write_text(json.dumps(settings | (config or {})))
    if tensors is None:
        tensors = adapter_tensors(arch, rank, targets, seed, **scales)
    save_file({name: t.contiguous() for name, t in tensors.items()}, folder / "adapter_model.safetensors")
    return folder
