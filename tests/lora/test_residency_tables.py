"""A resident adapter's cached column of the step tables (`ResidentAdapter.tables`) describes that residency
alone: an adapter loaded into the slots of an evicted one, and the evicted one loaded again elsewhere, each
get tables of their own, and a step's `LoRABatch` is built from those."""

from __future__ import annotations

import numpy as np
import torch

from slora import LLM
from slora.architecture import ArchitectureSpec
from slora.fixtures import write_adapter
from slora.kernels.lora import LoRABatch
from slora.lora.adapter import AdapterSpec
from slora.lora.residency import ResidentAdapter


def _expected(adapter: ResidentAdapter, spec: AdapterSpec,
              arch: ArchitectureSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row table, ranks and scalings of an adapter, from its slots and its registered spec."""
    ranks = np.zeros((arch.num_layers, len(arch.targets)), dtype=np.int32)
    scalings = np.zeros((arch.num_layers, len(arch.targets)), dtype=np.float32)
    for (layer, module), rank in spec.layer_ranks.items():
        ranks[layer, arch.index[module]] = rank
        scalings[layer, arch.index[module]] = spec.layer_scalings[(layer, module)]
    rows = [row for slot in adapter.slot_ids for row in (2 * slot, 2 * slot + 1)][: adapter.layout.num_rows]
    return np.array(rows, dtype=np.int32), ranks, scalings


def _check(adapter: ResidentAdapter, spec: AdapterSpec, arch: ArchitectureSpec) -> None:
    row_table, ranks, scalings = _expected(adapter, spec, arch)
    batch = LoRABatch.from_lists([adapter], [[0, 1]], arch.num_layers, len(arch.targets), "cpu")
    assert np.array_equal(adapter.tables.row_table, row_table)
    assert np.array_equal(batch.row_table.numpy(), row_table)
    assert np.array_equal(batch.ranks[:, :, 0].numpy(), ranks)
    assert np.array_equal(batch.scalings[:, :, 0].numpy(), scalings)
    for module, rows in adapter.layout.modules.items():
        assert batch.a_offsets[arch.index[module], 0].item() == rows.a_start
        assert batch.b_offsets[arch.index[module], 0].item() == rows.b_start


def test_tables_follow_each_residency(tiny_llama_folder, tiny_llama_arch, tmp_path):
    folder, arch = tiny_llama_folder[1], tiny_llama_arch
    paths = {name: str(write_adapter(tmp_path / name, arch, rank, targets, seed=seed, alpha=alpha))
             for seed, (name, rank, targets, alpha) in enumerate([("a", 4, ["q_proj", "v_proj"], 8),
                                                                  ("b", 8, ["k_proj", "o_proj", "down_proj"], 32)])}
    llm = LLM(model=str(folder), adapters=paths, num_slots=256, adapter_prefetch=0)
    residency, specs = llm.engine.residency, {name: llm.engine.registry.get(name) for name in paths}
    a = residency.acquire("a")
    residency.release("a")
    _check(a, specs["a"], arch)
    assert residency.make_room(residency.pool.num_free + 1)  # evicts "a", the only idle adapter
    assert not residency.is_resident("a")
    b = residency.acquire("b")
    assert set(b.slot_ids) & set(a.slot_ids)  # b reuses a's slots
    _check(b, specs["b"], arch)
    again = residency.acquire("a")
    assert again is not a and again.slot_ids != a.slot_ids
    _check(again, specs["a"], arch)
    batch = LoRABatch.from_lists([b, again], [[0], [1, 2]], arch.num_layers, len(arch.targets), "cpu")
    expected_rows = np.concatenate([b.tables.row_table, again.tables.row_table])
    assert torch.equal(batch.row_table, torch.from_numpy(expected_rows))
    assert batch.a_offsets[arch.index["q_proj"], 1].item() == b.layout.num_rows  # "a"'s rows follow "b"'s
