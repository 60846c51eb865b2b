"""An adapter's weights as pool rows: the chunked layout shared by the host store and the pool.

For each targeted module with `A: [r, in]` and `B: [out, r]`, every row of `A` and of `B^T` is cut
into `ceil(dim / kv_dim)` chunks of `kv_dim` elements (the last zero-padded), one pool row each, in
the canonical order (module, A then B^T, rank row, chunk). The same row ids serve every layer, so a
module takes rows for its largest rank over the layers; a layer with a smaller rank, or one the
adapter skips, leaves its rows zero and its `rank(layer, module)` says how many rows to read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slora.architecture import ArchitectureSpec
from slora.lora.adapter import AdapterSpec, LoRAWeights


@dataclass(frozen=True)
class ModuleRows:
    a_start: int  # first canonical row of A
    a_chunks: int  # rows per rank row of A: ceil(in / kv_dim)
    b_start: int  # first canonical row of B^T
    b_chunks: int  # rows per rank row of B^T: ceil(out / kv_dim)
    in_features: int
    out_features: int


@dataclass(frozen=True)
class RowLayout:
    modules: dict[str, ModuleRows]
    num_rows: int

    @property
    def num_slots(self) -> int:
        """Pool slots the adapter occupies: each slot is two rows (its K and its V)."""
        return math.ceil(self.num_rows / 2)

    @classmethod
    def of(cls, spec: AdapterSpec, arch: ArchitectureSpec) -> "RowLayout":
        kv_dim = arch.config.kv_dim
        modules, row = {}, 0
        for module in spec.target_modules:
            rank = spec.ranks[module]
            in_features, out_features = arch.shape(module)
            a_chunks, b_chunks = math.ceil(in_features / kv_dim), math.ceil(out_features / kv_dim)
            modules[module] = ModuleRows(row, a_chunks, row + rank * a_chunks, b_chunks, in_features, out_features)
            row += rank * (a_chunks + b_chunks)
        return cls(modules, row)


def pack_rows(weights: dict[tuple[int, str], LoRAWeights], layout: RowLayout, arch: ArchitectureSpec) -> torch.Tensor:
    """Weights -> `[num_layers, num_rows, kv_dim]` float32, in the canonical row order."""
    kv_dim = arch.config.kv_dim
    rows = torch.zeros(arch.num_layers, layout.num_rows, kv_dim)
    for (layer, module), w in weights.items():
        m = layout.modules[module]
        rank = w.A.shape[0]
        for start, chunks, matrix in ((m.a_start, m.a_chunks, w.A), (m.b_start, m.b_chunks, w.B.T)):
            padded = torch.zeros(rank, chunks * kv_dim)
            padded[:, : matrix.shape[1]] = matrix
            rows[layer, start : start + rank * chunks] = padded.view(rank * chunks, kv_dim)
    return rows
