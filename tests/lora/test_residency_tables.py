"""A resident adapter's cached column of the step tables (`ResidentAdapter.tables`) describes that residency
alone: an adapter loaded into the slots of an evicted one, and the evicted one loaded again elsewhere, each
get tables of their own, and a step's `LoRABatch` is built from those."""

from __future__ import annotations

import json

import numpy as np
import torch

from slora import LLM
from slora.config import ModelConfig
from slora.kernels.lora import MODULE_INDEX, LoRABatch
from slora.lora.residency import ResidentAdapter
from tests.reference.peft import write_lora_folder


def _expected(adapter: ResidentAdapter, num_layers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row table, ranks and scalings of an adapter, read from what it was loaded with."""
    ranks = np.zeros((num_layers, len(MODULE_INDEX)), dtype=np.int32)
    scalings = np.zeros((num_layers, len(MODULE_INDEX)), dtype=np.float32)
    for (layer, module), rank in adapter.layer_ranks.items():
        ranks[layer, MODULE_INDEX[module]] = rank
        scalings[layer, MODULE_INDEX[module]] = adapter.layer_scalings[(layer, module)]
    return adapter.row_table.cpu().numpy(), ranks, scalings


def _check(adapter: ResidentAdapter, num_layers: int) -> None:
    row_table, ranks, scalings = _expected(adapter, num_layers)
    batch = LoRABatch.from_lists([adapter], [[0, 1]], num_layers, "cpu")
    assert np.array_equal(adapter.tables(num_layers).row_table, row_table)
    assert np.array_equal(batch.row_table.numpy(), row_table)
    assert np.array_equal(batch.ranks[:, :, 0].numpy(), ranks)
    assert np.array_equal(batch.scalings[:, :, 0].numpy(), scalings)
    for module, rows in adapter.layout.modules.items():
        assert batch.a_offsets[MODULE_INDEX[module], 0].item() == rows.a_start
        assert batch.b_offsets[MODULE_INDEX[module], 0].item() == rows.b_start


def test_tables_follow_each_residency(tiny_llama_folder, tmp_path):
    folder = tiny_llama_folder[1]
    config = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    paths = {name: str(write_lora_folder(tmp_path / name, config.num_layers, config.module_shapes(), rank=rank,
                                         targets=targets, alpha=alpha, seed=seed))
             for seed, (name, rank, targets, alpha) in enumerate([("a", 4, ["q_proj", "v_proj"], 8),
                                                                  ("b", 8, ["k_proj", "o_proj", "down_proj"], 32)])}
    llm = LLM(model=str(folder), adapters=paths, num_slots=256, adapter_prefetch=0)
    residency, num_layers = llm.engine.residency, config.num_layers
    a = residency.acquire("a")
    residency.release("a")
    _check(a, num_layers)
    assert residency.make_room(residency.pool.num_free + 1)  # evicts "a", the only idle adapter
    assert not residency.is_resident("a")
    b = residency.acquire("b")
    assert set(b.slot_ids) & set(a.slot_ids)  # b reuses a's slots
    _check(b, num_layers)
    again = residency.acquire("a")
    assert again is not a and again.slot_ids != a.slot_ids
    _check(again, num_layers)
    batch = LoRABatch.from_lists([b, again], [[0], [1, 2]], num_layers, "cpu")
    assert torch.equal(batch.row_table.long(), torch.cat([b.row_table, again.row_table]))
    assert batch.a_offsets[MODULE_INDEX["q_proj"], 1].item() == b.layout.num_rows  # "a"'s rows follow "b"'s
