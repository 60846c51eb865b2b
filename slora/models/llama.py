"""The Llama family in plain torch: Llama 2/3 (with Llama 3.1 rope scaling), Mistral, Qwen2, SmolLM2.

The whole forward pass of one flat batch is in this file. Parameter names equal Hugging Face's, so
a checkpoint's state dict loads as it is and PEFT's target names (`q_proj`, ...) mean the same
modules. Sequences are concatenated into one token dimension; attention reads and writes K/V in
the unified pool through `ForwardBatch.attention`, and every LoRA-targeted projection adds `ForwardBatch.lora`'s delta, so this file knows nothing of scheduling or adapter residency.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slora.config import ModelConfig
from slora.kernels import attention
from slora.kernels.metadata import ForwardBatch


def _project(linear: nn.Linear, x: torch.Tensor, batch: ForwardBatch, layer: int, name: str) -> torch.Tensor:
    """A LoRA-targetable projection: the base linear, plus the batch's adapters' delta when it has any."""
    y = linear(x)
    if batch.lora is not None:
        batch.lora.add_delta(y, x, layer, name)
    return y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).float()
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(is_mid, blended, scaled).float()


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to the context length, indexed by each token's position."""

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inverse_frequencies(config))
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D/2]
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, config.q_dim, bias=bias)
        self.k_proj = nn.Linear(h, config.kv_dim, bias=bias)
        self.v_proj = nn.Linear(h, config.kv_dim, bias=bias)
        self.o_proj = nn.Linear(config.q_dim, h, bias=False)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, batch: ForwardBatch) -> torch.Tensor:
        q = _project(self.q_proj, x, batch, self.layer, "q_proj").view(-1, self.num_heads, self.head_dim)
        k = _project(self.k_proj, x, batch, self.layer, "k_proj").view(-1, self.num_kv_heads, self.head_dim)
        v = _project(self.v_proj, x, batch, self.layer, "v_proj").view(-1, self.num_kv_heads, self.head_dim)
        q, k = rotary(batch.positions, q, k)
        out = attention.attend(q, k, v, batch.kv_cache[self.layer], batch.attention, batch.backend)
        return _project(self.o_proj, out.flatten(1), batch, self.layer, "o_proj")


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        gate = _project(self.gate_proj, x, batch, self.layer, "gate_proj")
        up = _project(self.up_proj, x, batch, self.layer, "up_proj")
        return _project(self.down_proj, F.silu(gate) * up, batch, self.layer, "down_proj")


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, batch)
        return x + self.mlp(self.post_attention_layernorm(x), batch)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """`model.*` and `lm_head` as in Hugging Face; `forward` returns logits at `batch.logits_indices`."""

    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config, max_positions or config.max_position_embeddings)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x = self.model.embed_tokens(batch.input_ids)
        for layer in self.model.layers:
            x = layer(x, self.rotary, batch)
        x = self.model.norm(x[batch.logits_indices])
        return self.lm_head(x)
