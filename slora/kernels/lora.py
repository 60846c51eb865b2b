"""The batched LoRA op on the unified pool, torch reference version (the oracle for fast kernels).

For every token t with adapter a(t): `y[t] += s_a * (x[t] @ A_a^T) @ B_a^T`, where A and B^T are
read in place from the pool's rows through the adapter's row table (no contiguous copy is kept).
Tokens are grouped by adapter (S-LoRA's segments; a decode token is a segment of one), so
adapters of different ranks share one batch and tokens without an adapter cost nothing.

`LoRABatch` is the same step as flat tensors, built once per step for the Triton kernels
(`triton_lora.py`): one segment per adapter, the adapters' row tables concatenated, and per
(layer, module) every adapter's rank and scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slora.kernels.metadata import Projection
from slora.lora.residency import ResidentAdapter


def read_rows(rows: torch.Tensor, row_ids: torch.Tensor, rank: int, chunks: int, width: int) -> torch.Tensor:
    """Rows `row_ids` of a pool layer as a `[rank, width]` matrix (chunks joined, padding cut)."""
    return rows[row_ids].view(rank, chunks * rows.shape[1])[:, :width]


def shrink(x: torch.Tensor, rows: torch.Tensor, a_row_ids: torch.Tensor, rank: int, chunks: int) -> torch.Tensor:
    """`x @ A^T`: [n, in] -> [n, rank]."""
    a = read_rows(rows, a_row_ids, rank, chunks, x.shape[1])
    return x @ a.to(x.dtype).T


def expand(y: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, b_row_ids: torch.Tensor, chunks: int,
           scaling: float) -> torch.Tensor:
    """`y + s * v @ B^T`: v [n, rank] -> [n, out]."""
    b_t = read_rows(rows, b_row_ids, v.shape[1], chunks, y.shape[1])
    return y + scaling * (v @ b_t.to(v.dtype))


@dataclass
class AdapterTokens:
    adapter: ResidentAdapter
    token_indices: torch.Tensor  # positions in the flat batch of the tokens that use it


# Every LoRA-targetable linear of a decoder layer, in the order of the module axis of `LoRABatch`.
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULE_INDEX = {name: m for m, name in enumerate(MODULES)}


@dataclass
class LoRABatch:
    """One step's adapters and tokens as the tensors the Triton LoRA kernels read.

    Adapter j (`adapters[j]`) is segment j: the flat-batch tokens `token_indices[segment_starts[j] :
    segment_starts[j + 1]]`. Its canonical row `c` of module m is pool row
    `row_table[a_offsets[m, j] + c]` (A) or `row_table[b_offsets[m, j] + c]` (B^T); its rank and
    scaling at (layer, m) are `ranks[layer, m, j]` and `scalings[layer, m, j]` (rank 0: not targeted).
    """

    adapters: list[ResidentAdapter]
    row_table: torch.Tensor  # [sum of num_rows] int32: the adapters' row tables, concatenated
    a_offsets: torch.Tensor  # [num_modules, num_adapters] int32
    b_offsets: torch.Tensor  # [num_modules, num_adapters] int32
    ranks: torch.Tensor  # [num_layers, num_modules, num_adapters] int32
    scalings: torch.Tensor  # [num_layers, num_modules, num_adapters] float32
    token_indices: torch.Tensor  # [num_lora_tokens] int32, grouped by adapter
    token_adapters: torch.Tensor  # [num_lora_tokens] int32: the adapter of each of those tokens
    segment_starts: torch.Tensor  # [num_adapters + 1] int32
    max_ranks: list[list[int]]  # [num_layers][num_modules], on the host: launch sizes, 0 = skip
    max_segment_len: int

    @property
    def num_tokens(self) -> int:
        return self.token_indices.numel()

    @property
    def num_segments(self) -> int:
        """Programs along the adapter axis: one per segment (some may be empty in a captured step)."""
        return self.segment_starts.numel() - 1

    @property
    def table_width(self) -> int:
        """Columns of the offset, rank and scaling tables (>= num_segments in a captured step)."""
        return self.ranks.shape[-1]

    @classmethod
    def build(cls, groups: list[AdapterTokens], num_layers: int, device: torch.device | str) -> "LoRABatch":
        return cls.from_lists([g.adapter for g in groups], [g.token_indices.tolist() for g in groups], num_layers,
                              device)

    @classmethod
    def from_lists(cls, adapters: list[ResidentAdapter], token_lists: list[list[int]], num_layers: int,
                   device: torch.device | str) -> "LoRABatch":
        """Adapter j's tokens are `token_lists[j]` (positions in the flat batch)."""
        num_modules, num_adapters = len(MODULES), len(adapters)
        # Filled on the host (numpy: cheap per element), then copied to the device once.
        a_offsets = np.zeros((num_modules, num_adapters), dtype=np.int32)
        b_offsets = np.zeros((num_modules, num_adapters), dtype=np.int32)
        ranks = np.zeros((num_layers, num_modules, num_adapters), dtype=np.int32)
        scalings = np.zeros((num_layers, num_modules, num_adapters), dtype=np.float32)
        row_offset = 0
        for j, adapter in enumerate(adapters):
            for module, rows in adapter.layout.modules.items():
                a_offsets[MODULE_INDEX[module], j] = row_offset + rows.a_start
                b_offsets[MODULE_INDEX[module], j] = row_offset + rows.b_start
            ranks[:, :, j], scalings[:, :, j] = _rank_tables(adapter, num_layers)
            row_offset += adapter.layout.num_rows
        lengths = np.array([len(tokens) for tokens in token_lists], dtype=np.int32)
        starts = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
        tokens = np.fromiter((t for group in token_lists for t in group), dtype=np.int32, count=int(starts[-1]))
        to_device = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
        return cls(
            adapters=adapters,
            row_table=torch.cat([a.row_table for a in adapters]).to(device=device, dtype=torch.int32),
            a_offsets=to_device(a_offsets), b_offsets=to_device(b_offsets),
            ranks=to_device(ranks), scalings=to_device(scalings),
            token_indices=to_device(tokens),
            token_adapters=to_device(np.repeat(np.arange(num_adapters, dtype=np.int32), lengths)),
            segment_starts=to_device(starts),
            max_ranks=(ranks.max(axis=2) if num_adapters else np.zeros((num_layers, num_modules), int)).tolist(),
            max_segment_len=int(lengths.max(initial=0)),
        )


_RANK_TABLES: dict[int, tuple[ResidentAdapter, np.ndarray, np.ndarray]] = {}


def _rank_tables(adapter: ResidentAdapter, num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """`[num_layers, num_modules]` ranks and scalings of one adapter, computed once while it is resident."""
    cached = _RANK_TABLES.get(id(adapter))
    if cached is not None and cached[0] is adapter and cached[1].shape[0] == num_layers:
        return cached[1], cached[2]
    ranks = np.zeros((num_layers, len(MODULES)), dtype=np.int32)
    scalings = np.zeros((num_layers, len(MODULES)), dtype=np.float32)
    for (layer, module), rank in adapter.layer_ranks.items():
        ranks[layer, MODULE_INDEX[module]] = rank
        scalings[layer, MODULE_INDEX[module]] = adapter.layer_scalings[(layer, module)]
    if len(_RANK_TABLES) >= 4096:  # adapters come and go: forget the old ones now and then
        _RANK_TABLES.clear()
    _RANK_TABLES[id(adapter)] = (adapter, ranks, scalings)
    return ranks, scalings


class ModuleByModule:
    """A `LoRADelta` that applies the modules of a projection one after another, each to its columns."""

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, layer: int, projection: Projection) -> None:
        for module, columns in projection.columns(y):
            self.add_module_delta(columns, x, layer, module)

    def add_module_delta(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str) -> None:
        raise NotImplementedError


class TorchLoRA(ModuleByModule):
    """`LoRADelta` for one step: the batch's adapters and their tokens."""

    def __init__(self, layers: list[torch.Tensor], groups: list[AdapterTokens]):
        self.layers = layers
        self.groups = groups

    def add_module_delta(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str) -> None:
        pool_rows = self.layers[layer].view(-1, self.layers[layer].shape[-2] * self.layers[layer].shape[-1])
        for group in self.groups:
            adapter = group.adapter
            rank = adapter.layer_ranks.get((layer, module))
            if rank is None:
                continue
            m = adapter.layout.modules[module]
            a_ids = adapter.row_table[m.a_start : m.a_start + rank * m.a_chunks]
            b_ids = adapter.row_table[m.b_start : m.b_start + rank * m.b_chunks]
            idx = group.token_indices
            v = shrink(x[idx], pool_rows, a_ids, rank, m.a_chunks)
            y[idx] = expand(y[idx], v, pool_rows, b_ids, m.b_chunks, adapter.layer_scalings[(layer, module)])
