"""The unified pool: allocator, sizing, and adapters' rows next to the KV cache."""

from __future__ import annotations


import pytest
import torch

from slora import LLM, SamplingParams
from slora.config import ModelConfig, PoolConfig
from slora.memory.pool import PoolExhausted, UnifiedPool, parse_memory
from slora.fixtures import write_adapter

TINY = ModelConfig("llama", 64, 64, 128, 2, 4, 2, 16, 256)


def test_allocate_and_free_account_by_owner():
    pool = UnifiedPool(TINY, 10, torch.float32, "cpu")
    kv = pool.allocate(4, "kv")
    adapter = pool.allocate(3, "adapter")
    assert len(set(kv + adapter)) == 7
    assert pool.stats().kv_slots == 4 and pool.stats().adapter_slots == 3 and pool.num_free == 3
    with pytest.raises(PoolExhausted):
        pool.allocate(4, "kv")
    pool.free(kv, "kv")
    pool.free(adapter, "adapter")
    assert pool.num_free == 10 and pool.stats().used_slots == 0


def test_rows_view_shares_memory_with_slots():
    pool = UnifiedPool(TINY, 4, torch.float32, "cpu")
    pool.rows(1)[5] = 7.0  # row 5 = slot 2's V
    assert (pool.layers[1][2, 1] == 7.0).all() and pool.layers[1][2, 0].abs().sum() == 0


def test_sizing_from_bytes_and_fractions():
    per_slot = UnifiedPool.bytes_per_slot(TINY, torch.float32)
    assert per_slot == 2 * 2 * 32 * 4
    assert UnifiedPool.create(TINY, PoolConfig(memory=per_slot * 50), torch.float32, "cpu").num_slots == 50
    assert UnifiedPool.create(TINY, PoolConfig(num_slots=7), torch.float32, "cpu").num_slots == 7
    assert parse_memory("2GiB") == 2**31 and parse_memory("500MB") == 500 * 10**6 and parse_memory("0.5") == 0.5
    with pytest.raises(ValueError, match="pool memory"):
        parse_memory("lots")


def test_adapter_rows_scale_with_rank_and_every_slot_comes_back(tiny_llama_folder, tiny_llama_arch, tmp_path):
    ranks = [1, 2, 4, 8, 16]
    adapters = {f"r{r}": str(write_adapter(tmp_path / f"r{r}", tiny_llama_arch, r, ["q_proj", "k_proj", "v_proj", "o_proj"],
                                           seed=r, alpha=8)) for r in ranks}
    llm = LLM(model=str(tiny_llama_folder[1]), adapters=adapters, num_slots=2000)
    engine = llm.engine
    slots = [engine.residency.slots_needed(f"r{r}") for r in ranks]
    # q/o: 2 rows per rank row each way, k/v: 2 rows of A and 1 of B^T: 14 rows = 7 slots per rank.
    assert slots == [7 * r for r in ranks]
    llm.generate([[3, 4, 5]] * len(ranks), SamplingParams(max_tokens=3), adapters=list(adapters))
    stats = engine.pool.stats()
    assert stats.adapter_slots == sum(slots) and stats.kv_slots == 0  # idle adapters stay resident
    for name in adapters:
        llm.remove_adapter(name)
    assert engine.pool.num_free == engine.pool.num_slots
