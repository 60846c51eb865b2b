"""Random pools and resident adapters for the kernel tests: weights in shuffled pool rows, never zero."""

from __future__ import annotations

import math

import torch

from slora.kernels.lora import AdapterTokens
from slora.lora.layout import ModuleRows, RowLayout
from slora.lora.residency import ResidentAdapter


def random_pool(num_layers: int, num_slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                device: torch.device, generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(num_slots, 2, kv_heads, head_dim, generator=generator).to(device, dtype)
            for _ in range(num_layers)]


def make_adapters(ranks: list[int], shapes: dict[str, tuple[int, int]], num_layers: int, kv_dim: int,
                  num_pool_rows: int, device: torch.device, generator: torch.Generator) -> list[ResidentAdapter]:
    """Adapters of the given ranks over `shapes`' modules, in shuffled pool rows (distinct per adapter).

    Some (layer, module) pairs take a smaller rank than the module's and some none at all, as
    `rank_pattern` / `layers_to_transform` make them.
    """
    free_rows = torch.randperm(num_pool_rows, generator=generator)
    adapters, used = [], 0
    for i, rank in enumerate(ranks):
        modules, row = {}, 0
        for module, (in_features, out_features) in shapes.items():
            a_chunks, b_chunks = math.ceil(in_features / kv_dim), math.ceil(out_features / kv_dim)
            modules[module] = ModuleRows(row, a_chunks, row + rank * a_chunks, b_chunks, in_features, out_features)
            row += rank * (a_chunks + b_chunks)
        layout = RowLayout(modules, row)
        row_table = free_rows[used : used + row].to(device)
        assert row_table.numel() == row, "the pool is too small for these adapters"
        used += row
        layer_ranks, layer_scalings = {}, {}
        for layer in range(num_layers):
            for m, module in enumerate(shapes):
                if (i + layer + m) % 5 == 4:  # this adapter skips this (layer, module)
                    continue
                layer_rank = rank if (i + m) % 3 else max(1, rank // 2)
                layer_ranks[(layer, module)] = layer_rank
                layer_scalings[(layer, module)] = 0.5 + (i % 4) * 0.25
        adapters.append(ResidentAdapter(f"a{i}", layout, [], row_table, layer_ranks, layer_scalings))
    return adapters


def group_tokens(adapter_of_token: list[int | None], adapters: list[ResidentAdapter],
                 device: torch.device) -> list[AdapterTokens]:
    """Tokens -> per-adapter groups (in order of first use), as `engine/batch.py` builds them."""
    by_adapter: dict[int, list[int]] = {}
    for t, a in enumerate(adapter_of_token):
        if a is not None:
            by_adapter.setdefault(a, []).append(t)
    return [AdapterTokens(adapters[a], torch.tensor(tokens, dtype=torch.int64, device=device))
            for a, tokens in by_adapter.items()]
