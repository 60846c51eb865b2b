"""What the kernels read for one engine step: the flat batch, its attention layout and LoRA op, and
the interfaces the model calls them through.

`engine/batch.py` builds these from a step's scheduled sequences; the model and kernels only read
them, so neither knows about requests, scheduling or adapter residency.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from slora.architecture import Projection

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
    # `query_lens`, `query_starts` and `context_lens` on the host (what `prefill_items` and the torch
    # reference read); None in a CUDA graph's static table.
    host_query_lens: np.ndarray | None = None
    host_query_starts: np.ndarray | None = None
    host_context_lens: np.ndarray | None = None
    # The prefill kernel's programs along the queries of the rows from `num_decode` on: fixed ones (a
    # CUDA graph's static table, whose row views keep them), else made by `prefill_items` per block size.
    items: torch.Tensor | None = None
    _items: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _parts: tuple["SlotTable | None", "SlotTable"] | None = field(default=None, repr=False)

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
        as_int32 = lambda values: to_device(np.ascontiguousarray(values, dtype=np.int32), torch.device(device))  # noqa: E731
        starts = np.asarray(query_starts, dtype=np.int32)[order]
        return cls(
            slots=as_int32(padded),
            context_lens=as_int32(context_lens[order]),
            query_starts=as_int32(starts),
            query_lens=as_int32(lens[order]),
            max_query_len=int(lens.max(initial=0)),
            max_context_len=width,
            num_decode=num_decode,
            decode_max_context_len=int(context_lens[order[:num_decode]].max(initial=0)),
            host_query_lens=lens[order],
            host_query_starts=starts,
            host_context_lens=context_lens[order],
        )

    def rows(self, start: int, end: int, max_query_len: int, max_context_len: int,
             items: torch.Tensor | None = None) -> "SlotTable":
        """Rows `[start, end)` as a table of their own (views: nothing is copied)."""
        host = [None if a is None else a[start:end]
                for a in (self.host_query_lens, self.host_query_starts, self.host_context_lens)]
        return SlotTable(self.slots[start:end], self.context_lens[start:end], self.query_starts[start:end],
                         self.query_lens[start:end], max_query_len, max_context_len,
                         end - start if max_query_len == 1 else 0, max_context_len if max_query_len == 1 else 0,
                         *host, items)

    def parts(self) -> tuple["SlotTable | None", "SlotTable"]:
        """A step with prompt chunks as (its decoding rows or None, its other rows): made once per step,
        so that every layer's prefill launch reuses the same work items."""
        if self._parts is None:
            num_seqs, num_decode = self.slots.shape[0], self.num_decode
            decode = self.rows(0, num_decode, 1, self.decode_max_context_len) if num_decode else None
            self._parts = decode, self.rows(num_decode, num_seqs, self.max_query_len, self.max_context_len, self.items)
        return self._parts

    def host_prefill_items(self, block_m: int) -> np.ndarray:
        """[n, 2] int32 (row, query block): one per block of `block_m` queries of each row, so that no
        program of the prefill kernel is left without queries (a row-by-longest-row grid would be)."""
        lens = self.host_query_lens if self.host_query_lens is not None else self.query_lens.cpu().numpy()
        return block_items(-(-lens.astype(np.int64) // block_m))

    def prefill_items(self, block_m: int) -> torch.Tensor:
        if self.items is not None:
            return self.items
        if block_m not in self._items:
            self._items[block_m] = to_device(self.host_prefill_items(block_m), self.slots.device)
        return self._items[block_m]


def block_items(counts: np.ndarray) -> np.ndarray:
    """[sum(counts), 2] int32: (i, 0), (i, 1), ..., (i, counts[i] - 1) for each i in order: the work items
    of kernels whose programs each take one part of a row, segment or sequence."""
    items = np.empty((int(counts.sum()), 2), dtype=np.int32)
    items[:, 0] = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    items[:, 1] = np.arange(len(items), dtype=np.int32) - np.repeat(np.cumsum(counts) - counts, counts)
    return items


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host table on `device`: through pinned memory on CUDA, so the copy does not wait."""
    host = torch.from_numpy(array)
    return (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)


def int64_tensor(values, device: torch.device | str) -> torch.Tensor:
    """Integers (a list or an array) as an int64 tensor on `device`, copied as `to_device` does."""
    return to_device(np.asarray(values, dtype=np.int64), torch.device(device))


@dataclass
class AttentionMetadata:
    """Where each new token's K/V go in the pool (`slot_mapping`) and each sequence's context (`slot_table`)."""

    slot_mapping: torch.Tensor  # [T] int64: pool slot of each new token's K/V
    slot_table: SlotTable
    scale: float  # the softmax scale


class LoRAOp(Protocol):
    """The LoRA op contract: for each token t with adapter a(t), add `s_a * (x[t] @ A_a^T) @ B_a^T` of each
    module of a projection into that module's columns of the projection's output y.

    In two halves, so that the base GEMM can run between them: `start` needs only x (the shrink) and
    returns what `finish` needs, or None when no adapter of the batch targets the projection at this
    layer; `finish` adds the delta into y. A later op may compute `start`'s part elsewhere (a side
    stream, a LoRA server) while the GEMM runs.
    """

    def start(self, x: torch.Tensor, layer: int, projection: Projection) -> Any | None: ...

    def finish(self, started: Any, y: torch.Tensor) -> None: ...


class Backend(Protocol):
    """The kernels a model calls (`kernels/backend.py` has the implementations)."""

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]: ...

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                  layer: int, batch: "ForwardBatch") -> torch.Tensor: ...


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    logits_indices: torch.Tensor  # [N]: the tokens whose next-token logits are needed
    attention: AttentionMetadata
    kv_cache: list[torch.Tensor]  # the pool's per-layer tensors [num_slots, 2, kv_heads, head_dim]
    backend: Backend
    lora: LoRAOp | None = None
