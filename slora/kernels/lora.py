"""The batched LoRA op on the unified pool, torch reference version (the oracle for fast kernels).

For every token t with adapter a(t): `y[t] += s_a * (x[t] @ A_a^T) @ B_a^T`, where A and B^T are
read in place from the pool's rows through the adapter's row table (no contiguous copy is kept).
Tokens are grouped by adapter (S-LoRA's segments; a decode token is a segment of one), so
adapters of different ranks share one batch and tokens without an adapter cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


class TorchLoRA:
    """`LoRADelta` for one step: the batch's adapters and their tokens."""

    def __init__(self, layers: list[torch.Tensor], groups: list[AdapterTokens]):
        self.layers = layers
        self.groups = groups

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str) -> None:
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
