"""The Llama family in plain torch: Llama 2/3 (with Llama 3.1 rope scaling), Mistral, Qwen2, SmolLM2.

The family's architecture spec (`llama_spec`: its LoRA targets and fused projections) and the whole
forward pass of one flat batch are in this file. Parameter names equal Hugging Face's, so a
checkpoint's state dict loads as it is and PEFT's target names (`q_proj`, ...) mean the same
modules. Sequences are concatenated into one token dimension; the batch's backend computes the norms
and attention (which reads and writes K/V in the unified pool), and every LoRA-targeted projection
adds the batch's LoRA op's delta, so this file knows nothing of kernels, scheduling or adapter
residency.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slora.architecture import ArchitectureSpec, Projection, TargetModule
from slora.config import ModelConfig
from slora.kernels.metadata import ForwardBatch


def llama_spec(config: ModelConfig) -> ArchitectureSpec:
    """The Llama family's LoRA targets: q/k/v and gate/up column-parallel, o and down row-parallel; q/k/v
    and gate/up each run as one GEMM (one input each), o and down alone."""
    h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_dim, config.kv_dim
    targets = (TargetModule("q_proj", "self_attn", h, q, "column"), TargetModule("k_proj", "self_attn", h, kv, "column"),
               TargetModule("v_proj", "self_attn", h, kv, "column"), TargetModule("o_proj", "self_attn", q, h, "row"),
               TargetModule("gate_proj", "mlp", h, i, "column"), TargetModule("up_proj", "mlp", h, i, "column"),
               TargetModule("down_proj", "mlp", i, h, "row"))
    projections = (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)), ("gate_up", ("gate_proj", "up_proj")),
                   ("down", ("down_proj",)))
    return ArchitectureSpec("llama", config, targets, projections)


def _fused_weights(owner: nn.Module, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for linears of one input, so that they run as one GEMM.

    Made on first use by concatenating the linears' weights, which then become views of it: no
    extra memory and the state dict keeps Hugging Face's names. Made again if a weight was replaced
    (a state dict loaded with `assign=True`).
    """
    ptrs = [linear.weight.data_ptr() for linear in linears]
    if owner.__dict__.get("_fused_ptrs") != ptrs:
        with torch.inference_mode(False), torch.no_grad():
            weight = torch.cat([linear.weight for linear in linears])
            has_bias = linears[0].bias is not None
            bias = torch.cat([linear.bias for linear in linears]) if has_bias else None
            start = 0
            for linear in linears:
                rows = linear.weight.shape[0]
                linear.weight.data = weight[start : start + rows]
                if has_bias:
                    linear.bias.data = bias[start : start + rows]
                start += rows
        owner.__dict__["_fused"] = (weight, bias)
        owner.__dict__["_fused_ptrs"] = [linear.weight.data_ptr() for linear in linears]
    return owner.__dict__["_fused"]


def _project(owner: nn.Module, linears: tuple[nn.Linear, ...], projection: Projection, x: torch.Tensor,
             batch: ForwardBatch, layer: int) -> torch.Tensor:
    """LoRA-targetable linears of one input as one GEMM, plus the batch's adapters' deltas if any: the
    LoRA op's first half before the GEMM, its second after (see `LoRAOp`)."""
    weight, bias = _fused_weights(owner, linears) if len(linears) > 1 else (linears[0].weight, linears[0].bias)
    started = batch.lora.start(x, layer, projection) if batch.lora is not None else None
    y = F.linear(x, weight, bias)
    if started is not None:
        batch.lora.finish(started, y)
    return y


class RMSNorm(nn.Module):
    """RMSNorm's weight and epsilon; the backend computes it (`Backend.add_rms_norm`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                     batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """`(norm(r), r)` with `r = residual + x` (or `x` at the first layer)."""
        return batch.backend.add_rms_norm(x, residual, self.weight, self.eps)


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
    """cos/sin tables for every position up to the context length, which the backend's attention
    indexes by each token's position."""

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inverse_frequencies(config))
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)


class Attention(nn.Module):
    def __init__(self, arch: ArchitectureSpec, layer: int):
        super().__init__()
        config = arch.config
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, config.q_dim, bias=bias)
        self.k_proj = nn.Linear(h, config.kv_dim, bias=bias)
        self.v_proj = nn.Linear(h, config.kv_dim, bias=bias)
        self.o_proj = nn.Linear(config.q_dim, h, bias=False)
        self.qkv, self.o = arch.projections["qkv"], arch.projections["o"]

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, batch: ForwardBatch) -> torch.Tensor:
        qkv = _project(self, (self.q_proj, self.k_proj, self.v_proj), self.qkv, x, batch, self.layer)
        q, k, v = qkv.split(self.qkv.widths, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = batch.backend.attention(q, k, v, (rotary.cos, rotary.sin), self.layer, batch)
        return _project(self, (self.o_proj,), self.o, out.flatten(1), batch, self.layer)


class MLP(nn.Module):
    def __init__(self, arch: ArchitectureSpec, layer: int):
        super().__init__()
        config = arch.config
        self.layer = layer
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up, self.down = arch.projections["gate_up"], arch.projections["down"]

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        gate, up = _project(self, (self.gate_proj, self.up_proj), self.gate_up, x, batch, self.layer).chunk(2, dim=-1)
        activated = F.silu(gate) * up  # on both backends: a fused Triton version was slower (triton_fused.py)
        return _project(self, (self.down_proj,), self.down, activated, batch, self.layer)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchitectureSpec, layer: int):
        super().__init__()
        config = arch.config
        self.self_attn = Attention(arch, layer)
        self.mlp = MLP(arch, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rotary: RotaryEmbedding,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the next norm adds the two."""
        normed, residual = self.input_layernorm.add_and_norm(x, residual, batch)
        x = self.self_attn(normed, rotary, batch)
        normed, residual = self.post_attention_layernorm.add_and_norm(x, residual, batch)
        return self.mlp(normed, batch), residual


class Decoder(nn.Module):
    def __init__(self, arch: ArchitectureSpec):
        super().__init__()
        config = arch.config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """`model.*` and `lm_head` as in Hugging Face; `forward` returns logits at `batch.logits_indices`."""

    def __init__(self, arch: ArchitectureSpec, max_positions: int | None = None):
        super().__init__()
        config = self.config = arch.config
        self.model = Decoder(arch)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config, max_positions or config.max_position_embeddings)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x, residual = self.model.embed_tokens(batch.input_ids), None
        for layer in self.model.layers:
            x, residual = layer(x, residual, self.rotary, batch)
        rows = batch.logits_indices
        x, _ = self.model.norm.add_and_norm(x[rows], residual[rows] if residual is not None else None, batch)
        return self.lm_head(x)
