"""The fused small ops equal the torch reference the model runs on the torch backend."""

from __future__ import annotations

import pytest
import torch

from slora.config import ModelConfig
from slora.kernels.attention import write_kv
from slora.kernels.triton_fused import add_rms_norm, rotate_and_write_kv
from slora.kernels import fused
from slora.models.llama import RotaryEmbedding

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [48, 576])  # not a power of two; SmolLM2's width
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(dtype, hidden, with_residual, device):
    generator = torch.Generator().manual_seed(hidden)
    weight = (1 + torch.randn(hidden, generator=generator)).to(device, dtype)
    x = (3 * torch.randn(7, hidden, generator=generator)).to(device, dtype)
    residual = torch.randn(7, hidden, generator=generator).to(device, dtype) if with_residual else None
    expected, expected_residual = fused.add_rms_norm(x, weight, 1e-5, residual)
    out, new_residual = add_rms_norm(x, weight, 1e-5, None if residual is None else residual.clone())
    _close(out, expected, dtype)
    _close(new_residual, expected_residual, dtype)
    if dtype != torch.bfloat16:  # the interpreter rounds float32 -> bfloat16 toward zero, GPUs to nearest
        assert torch.equal(new_residual, expected_residual)  # the add is rounded as torch rounds it


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, kv_heads", [(4, 4), (8, 2), (8, 1)])  # GQA ratios 1, 4, 8
def test_rotate_and_write_kv(dtype, num_heads, kv_heads, device):
    head_dim, tokens, num_slots = 16, 9, 40
    config = ModelConfig("llama", 100, num_heads * head_dim, 64, 1, num_heads, kv_heads, head_dim, 128,
                         rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                            "original_max_position_embeddings": 32})
    rotary = RotaryEmbedding(config, 128).to(device)
    generator = torch.Generator().manual_seed(num_heads * 10 + kv_heads)
    # q/k/v as views of one fused projection output, as the model hands them over.
    qkv = torch.randn(tokens, (num_heads + 2 * kv_heads) * head_dim, generator=generator).to(device, dtype)
    q, k, v = qkv.split([num_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(tokens, num_heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    positions = torch.randint(0, 128, (tokens,), generator=generator).to(device)
    slots = torch.randperm(num_slots, generator=generator)[:tokens].to(device)
    pool = torch.randn(num_slots, 2, kv_heads, head_dim, generator=generator).to(device, dtype)
    expected_q, expected_k = fused.rotate(q, k, positions, rotary.cos, rotary.sin)
    expected_pool = pool.clone()
    write_kv(expected_pool, slots, expected_k, v)
    rotate_and_write_kv(q, k, v, positions, rotary.cos, rotary.sin, pool, slots)
    _close(q, expected_q, dtype)
    _close(k, expected_k, dtype)
    _close(pool, expected_pool, dtype)  # the other slots are untouched
