"""What the kernels read for one engine step: the flat batch, its attention layout and LoRA hook.

`engine/batch.py` builds these from scheduled requests; the model and kernels only read them, so
neither knows about requests, scheduling or adapter residency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    """Where each sequence's queries are in the flat batch and where its K/V live in the pool.

    Sequence i owns query tokens `[query_starts[i], query_starts[i] + query_lens[i])`, which are
    the last `query_lens[i]` of its `context_slots[i]` (all of its tokens' slots, in order).
    """

    slot_mapping: torch.Tensor  # [T] int64: pool slot of each new token's K/V
    query_starts: list[int]
    query_lens: list[int]
    context_slots: list[torch.Tensor]  # per sequence, [context_len] int64
    scale: float


class LoRADelta(Protocol):
    """The LoRA op contract: add `s_a * (x @ A_a^T) @ B_a^T` for each token's adapter to `y`."""

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str) -> None: ...


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    logits_indices: torch.Tensor  # [N]: the tokens whose next-token logits are needed
    attention: AttentionMetadata
    kv_cache: list[torch.Tensor]  # the pool's per-layer tensors [num_slots, 2, kv_heads, head_dim]
    lora: LoRADelta | None = None
