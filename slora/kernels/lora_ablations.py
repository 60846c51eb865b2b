"""S-LoRA's two kernel ablations, as engine LoRA ops: what the Triton kernels are measured against.

Both pad every adapter to the batch's largest rank and run `torch.bmm`, reading the same pool
rows through the same `LoRABatch` tables as the Triton kernels (same contract as `lora.py`):

- `bmm` (S-LoRA's "gather + bmm"): at every op, gather each token's adapter rows from the pool into
  a `[tokens, max_rank, features]` batch, then two bmm;
- `padded` (S-LoRA's "padding to the largest rank"): at every op, gather each adapter's rows once into
  a padded `[adapters, max_rank, features]` stack, then give every token its adapter's matrix and bmm.

Rank rows past an adapter's rank at a layer are masked to zero, so both are exact (not just when the
pool's padding rows happen to be zero). Engine option `EngineConfig.lora_kernel`.
"""

from __future__ import annotations

import torch

from slora.architecture import Projection
from slora.kernels.lora import LoRABatch, pool_rows

# What `start` hands to `finish`: each module's delta and its first column in y.
Deltas = list[tuple[int, torch.Tensor]]


class PaddedBmmLoRA:
    """`gather="token"`: S-LoRA's gather + bmm ablation; `gather="adapter"`: its padded ablation."""

    def __init__(self, layers: list[torch.Tensor], batch: LoRABatch, gather: str):
        if gather not in ("token", "adapter"):
            raise ValueError(f"gather must be 'token' or 'adapter', got {gather!r}")
        self.layers = layers
        self.batch = batch
        self.gather = gather
        self.tokens = batch.token_indices.long()
        self.token_adapters = batch.token_adapters.long()
        # Each module's padded rank: its largest over the batch's adapters and the layers.
        self.max_ranks = [max(column) for column in zip(*batch.max_ranks)]

    def _padded(self, rows: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor, rank: int, chunks: int,
                width: int) -> torch.Tensor:
        """`[len(offsets), rank, width]`: for each adapter (offset into the row table) its first `rank`
        canonical rows, zero past its own rank."""
        canonical = offsets[:, None] + torch.arange(rank * chunks, device=rows.device)[None, :]
        row_ids = self.batch.row_table.long()[canonical.clamp_max(self.batch.row_table.numel() - 1)]
        matrix = rows[row_ids].view(len(offsets), rank, chunks * rows.shape[1])[:, :, :width]
        keep = torch.arange(rank, device=rows.device)[None, :] < ranks[:, None]
        return matrix * keep[:, :, None].to(matrix.dtype)

    def start(self, x: torch.Tensor, layer: int, projection: Projection) -> Deltas | None:
        deltas = [(start, self._delta(x, layer, m, width))
                  for m, start, width in zip(projection.targets, projection.starts, projection.widths)
                  if self.max_ranks[m] and self.tokens.numel()]
        return deltas or None

    def finish(self, started: Deltas, y: torch.Tensor) -> None:
        for start, delta in started:
            y[self.tokens, start : start + delta.shape[1]] += delta.to(y.dtype)

    def _delta(self, x: torch.Tensor, layer: int, m: int, out_features: int) -> torch.Tensor:
        """`s * (x @ A^T) @ B^T` of module m for every LoRA token: `[tokens, out_features]`."""
        rank, rows = self.max_ranks[m], pool_rows(self.layers[layer])
        kv_dim = rows.shape[1]
        a_chunks, b_chunks = -(-x.shape[1] // kv_dim), -(-out_features // kv_dim)
        ranks, scalings = self.batch.ranks[layer, m], self.batch.scalings[layer, m]
        if self.gather == "token":  # every token gathers its own adapter's rows
            pick = self.token_adapters
            a = self._padded(rows, self.batch.a_offsets[m][pick], ranks[pick], rank, a_chunks, x.shape[1])
            b = self._padded(rows, self.batch.b_offsets[m][pick], ranks[pick], rank, b_chunks, out_features)
        else:  # every adapter's rows once, padded; then each token takes its adapter's
            a = self._padded(rows, self.batch.a_offsets[m], ranks, rank, a_chunks, x.shape[1])[self.token_adapters]
            b = self._padded(rows, self.batch.b_offsets[m], ranks, rank, b_chunks, out_features)[self.token_adapters]
        v = torch.bmm(x[self.tokens].unsqueeze(1), a.to(x.dtype).transpose(1, 2))  # [n, 1, rank]
        return torch.bmm(v, b.to(x.dtype)).squeeze(1) * scalings[self.token_adapters][:, None].to(x.dtype)


__all__ = ["PaddedBmmLoRA"]
