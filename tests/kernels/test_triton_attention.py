"""Triton paged attention (prefill and decode) equals the torch reference over shuffled pool slots."""

from __future__ import annotations

import pytest
import torch

from slora.kernels import attention, triton_attention
from slora.bench.kernels import random_attention_batch
from slora.kernels.metadata import SlotTable

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _compare(query_lens, context_lens, num_heads, kv_heads, head_dim=16, dtype=torch.float32, device="cpu",
             seed=0, num_splits=None):
    generator = torch.Generator().manual_seed(seed)
    pool, meta, q, k, v = random_attention_batch(query_lens, context_lens, num_heads, kv_heads, head_dim, dtype,
                                                 device, generator, spare_slots=37)
    reference_pool, triton_pool = pool.clone(), pool.clone()
    reference = attention.paged_attention(q, k, v, reference_pool, meta)
    out = triton_attention.paged_attention(q, k, v, triton_pool, meta, num_splits=num_splits)
    assert torch.equal(triton_pool, reference_pool)  # new K/V written into their slots
    error = (out.float() - reference.float()).abs().max().item()
    assert error <= TOLERANCE[dtype], f"max error {error}"


@pytest.mark.parametrize("num_heads, kv_heads", [(4, 4), (8, 2), (8, 1)])  # GQA ratios 1, 4, 8
def test_prefill_variable_lengths_with_prefix(num_heads, kv_heads, device):
    # A whole prompt, a chunk after a prefix, a long chunk (several query and key blocks), a decode token.
    _compare([5, 7, 130, 1], [5, 40, 150, 9], num_heads, kv_heads, device=device, seed=num_heads + kv_heads)


@pytest.mark.parametrize("num_heads, kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_gqa_and_splits(num_heads, kv_heads, num_splits, device):
    # With 3 splits of 320 keys, the short contexts leave splits empty: they must weigh nothing.
    _compare([1, 1, 1, 1], [1, 7, 300, 130], num_heads, kv_heads, device=device, seed=num_splits,
             num_splits=num_splits)


def test_head_dim_not_a_power_of_two(device):
    _compare([6, 1], [10, 20], 6, 2, head_dim=24, device=device)
    _compare([1, 1], [10, 70], 6, 2, head_dim=24, device=device, num_splits=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype, device):
    _compare([5, 20], [5, 50], 8, 2, dtype=dtype, device=device)
    _compare([1, 1, 1], [3, 70, 140], 8, 2, dtype=dtype, device=device, num_splits=2)


@pytest.mark.parametrize("num_splits", [None, 2])
def test_mixed_step_decoding_rows_interleaved(num_splits, device):
    # Decoding sequences between chunks of prompts: they run on the decode kernel, the rest on prefill.
    _compare([1, 9, 1, 1, 70, 1], [40, 9, 3, 130, 100, 1], 8, 2, device=device, seed=5, num_splits=num_splits)


def test_slot_table_layout():
    table = SlotTable.build([0, 3, 4], [3, 1, 2], [[7, 1, 4], [9, 2, 5, 8, 6], [3, 11]], "cpu")
    # The one-query row first; the others keep their order.
    assert table.slots.shape[1] == 16 and not table.slots[:, 5:].any()  # rows padded to 16 slots
    assert table.slots[:, :5].tolist() == [[9, 2, 5, 8, 6], [7, 1, 4, 0, 0], [3, 11, 0, 0, 0]]
    assert table.context_lens.tolist() == [5, 3, 2] and table.query_lens.tolist() == [1, 3, 2]
    assert table.query_starts.tolist() == [3, 0, 4]
    assert (table.max_query_len, table.max_context_len) == (3, 5)
    assert (table.num_decode, table.decode_max_context_len) == (1, 5)
    rest = table.rows(1, 3, 3, 5)
    assert rest.slots[:, :5].tolist() == [[7, 1, 4, 0, 0], [3, 11, 0, 0, 0]] and rest.num_decode == 0
