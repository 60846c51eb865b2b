"""What the kernels read for one engine step: the flat batch, its attention layout and LoRA hook.

`engine/batch.py` builds these from scheduled requests; the model and kernels only read them, so
neither knows about requests, scheduling or adapter residency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass
class SlotTable:
    """The step's context slots as padded device tensors: what the Triton attention kernels read.

    Built once per step (not per layer): row i holds one sequence's slots, padded with 0 past
    `context_lens[i]`; its queries are flat tokens `[query_starts[i], query_starts[i] + query_lens[i])`.
    `build` puts the sequences with one query (decoding) in the first `num_decode` rows, so that a
    mixed step runs the decode kernel on those rows and the prefill kernel only on the rest: a
    prefill program per decode row would do a query block's work for one query.
    """

    slots: torch.Tensor  # [num_seqs, >= max_context_len] int32
    context_lens: torch.Tensor  # [num_seqs] int32
    query_starts: torch.Tensor  # [num_seqs] int32
    query_lens: torch.Tensor  # [num_seqs] int32
    max_query_len: int
    max_context_len: int
    num_decode: int = 0  # leading rows with one query each (all rows when max_query_len is 1)
    decode_max_context_len: int = 0  # the longest context among them

    @classmethod
    def build(cls, query_starts: list[int], query_lens: list[int], context_slots: list[np.ndarray | list[int]],
              device: torch.device | str) -> "SlotTable":
        lens = np.asarray(query_lens, dtype=np.int32)
        order = np.argsort(lens != 1, kind="stable")  # one-query rows first
        context_lens = np.fromiter((len(slots) for slots in context_slots), dtype=np.int32, count=len(context_slots))
        width = int(context_lens.max(initial=0))
        # Rows a multiple of 16 slots wide: a view from any row on stays 64-byte aligned (see `rows`).
        padded = np.zeros((len(context_slots), -(-width // 16) * 16), dtype=np.int32)
        for row, index in zip(padded, order):
            row[: context_lens[index]] = context_slots[index]
        num_decode = int((lens == 1).sum())
        as_int32 = lambda values: torch.from_numpy(np.ascontiguousarray(values, dtype=np.int32)).to(device)  # noqa: E731
        return cls(
            slots=as_int32(padded),
            context_lens=as_int32(context_lens[order]),
            query_starts=as_int32(np.asarray(query_starts, dtype=np.int32)[order]),
            query_lens=as_int32(lens[order]),
            max_query_len=int(lens.max(initial=0)),
            max_context_len=width,
            num_decode=num_decode,
            decode_max_context_len=int(context_lens[order[:num_decode]].max(initial=0)),
        )

    def rows(self, start: int, end: int, max_query_len: int, max_context_len: int) -> "SlotTable":
        """Rows `[start, end)` as a table of their own (views: nothing is copied)."""
        return SlotTable(self.slots[start:end], self.context_lens[start:end], self.query_starts[start:end],
                         self.query_lens[start:end], max_query_len, max_context_len,
                         end - start if max_query_len == 1 else 0, max_context_len if max_query_len == 1 else 0)


@dataclass
class AttentionMetadata:
    """Where each sequence's queries are in the flat batch and where its K/V live in the pool.

    Sequence i owns query tokens `[query_starts[i], query_starts[i] + query_lens[i])`, which are
    the last `query_lens[i]` of its `context_slots[i]` (all of its tokens' slots, in order).
    """

    slot_mapping: torch.Tensor  # [T] int64: pool slot of each new token's K/V
    query_starts: list[int]
    query_lens: list[int]
    context_slots: list[torch.Tensor] | None  # per sequence, [context_len]; None where `slot_table` holds them
    scale: float
    slot_table: SlotTable | None = None  # the slots padded into one tensor (Triton backend: all it reads)


@dataclass(frozen=True)
class Projection:
    """LoRA-targetable linears of one input run as one GEMM (q/k/v, gate/up, or one alone): module
    `modules[i]`'s output is columns `[starts[i], starts[i] + widths[i])` of the GEMM's output."""

    modules: tuple[str, ...]
    widths: tuple[int, ...]

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(int(s) for s in np.cumsum((0,) + self.widths[:-1]))

    def columns(self, y: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Each module's output as a view of `y`."""
        return [(m, y[:, s : s + w]) for m, s, w in zip(self.modules, self.starts, self.widths)]


class LoRADelta(Protocol):
    """The LoRA op contract: add `s_a * (x @ A_a^T) @ B_a^T` for each token's adapter to `y`, for
    each module of the projection, into that module's columns of `y`."""

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, layer: int, projection: Projection) -> None: ...


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    logits_indices: torch.Tensor  # [N]: the tokens whose next-token logits are needed
    attention: AttentionMetadata
    kv_cache: list[torch.Tensor]  # the pool's per-layer tensors [num_slots, 2, kv_heads, head_dim]
    lora: LoRADelta | None = None
    backend: str = "torch"  # "torch" (reference kernels) or "triton"
