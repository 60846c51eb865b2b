"""Random pools and resident adapters for the kernel tests: weights in shuffled pool rows, never zero."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slora.architecture import Projection

from slora.kernels.lora import LoRABatch
from slora.lora.layout import ModuleRows, RowLayout
from slora.lora.residency import AdapterTables, ResidentAdapter


def random_pool(num_layers: int, num_slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                device: torch.device, generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(num_slots, 2, kv_heads, head_dim, generator=generator).to(device, dtype)
            for _ in range(num_layers)]


@dataclass
class RandomAdapter:
    """A resident adapter in random pool rows, and what it was made with (the tests' expectations)."""

    resident: ResidentAdapter
    layer_ranks: dict[tuple[int, str], int]
    row_table: torch.Tensor  # [num_rows] int64 on the device: canonical row -> pool row

    @property
    def layout(self) -> RowLayout:
        return self.resident.layout


def projections(shapes: dict[str, tuple[int, int]], *groups: tuple[str, ...]) -> list[Projection]:
    """Projections of `shapes`' modules (the module axis in `shapes`' order), one per group."""
    index = {module: m for m, module in enumerate(shapes)}
    return [Projection("+".join(g), g, tuple(index[m] for m in g), tuple(shapes[m][1] for m in g), shapes[g[0]][0])
            for g in groups]


def make_adapters(ranks: list[int], shapes: dict[str, tuple[int, int]], num_layers: int, kv_dim: int,
                  num_pool_rows: int, device: torch.device, generator: torch.Generator) -> list[RandomAdapter]:
    """Adapters of the given ranks over `shapes`' modules, in shuffled pool rows (distinct per adapter).

    Some (layer, module) pairs take a smaller rank than the module's and some none at all, as
    `rank_pattern` / `layers_to_transform` make them. The module axis is `shapes`' order.
    """
    module_index = {module: m for m, module in enumerate(shapes)}
    free_rows = torch.randperm(num_pool_rows, generator=generator)
    adapters, used = [], 0
    for i, rank in enumerate(ranks):
        modules, row = {}, 0
        for module, (in_features, out_features) in shapes.items():
            a_chunks, b_chunks = math.ceil(in_features / kv_dim), math.ceil(out_features / kv_dim)
            modules[module] = ModuleRows(row, a_chunks, row + rank * a_chunks, b_chunks, in_features, out_features)
            row += rank * (a_chunks + b_chunks)
        layout = RowLayout(modules, row)
        row_table = free_rows[used : used + row].numpy()
        assert row_table.size == row, "the pool is too small for these adapters"
        used += row
        layer_ranks, layer_scalings = {}, {}
        for layer in range(num_layers):
            for m, module in enumerate(shapes):
                if (i + layer + m) % 5 == 4:  # this adapter skips this (layer, module)
                    continue
                layer_rank = rank if (i + m) % 3 else max(1, rank // 2)
                layer_ranks[(layer, module)] = layer_rank
                layer_scalings[(layer, module)] = 0.5 + (i % 4) * 0.25
        tables = AdapterTables.of(layout, layer_ranks, layer_scalings, row_table, module_index, num_layers)
        adapters.append(RandomAdapter(ResidentAdapter(f"a{i}", layout, [], tables), layer_ranks,
                                      torch.from_numpy(row_table).long().to(device)))
    return adapters


def lora_batch(adapter_of_token: list[int | None], adapters: list[RandomAdapter], num_layers: int,
               device: torch.device) -> LoRABatch:
    """A step's LoRA tables for tokens whose adapters are `adapter_of_token` (None: no adapter), the
    adapters in order of first use, as `engine/batch.py` builds them."""
    by_adapter: dict[int, list[int]] = {}
    for t, a in enumerate(adapter_of_token):
        if a is not None:
            by_adapter.setdefault(a, []).append(t)
    num_modules = len(adapters[0].layout.modules)
    return LoRABatch.from_lists([adapters[a].resident for a in by_adapter], list(by_adapter.values()), num_layers,
                                num_modules, device)

