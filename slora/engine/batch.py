"""Turns one step's scheduled requests into the flat tensors the model and kernels read.

This is the only place that knows both a request's state and the tensors' layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slora.architecture import ArchitectureSpec
from slora.engine.request import Request
from slora.engine.scheduler import ScheduledBatch
from slora.kernels.backend import TorchBackend
from slora.kernels.lora import LoRABatch
from slora.kernels.metadata import AttentionMetadata, ForwardBatch, LoRAOp, SlotTable, int64_tensor
from slora.lora.residency import AdapterResidency


@dataclass
class PendingTokens:
    """The last step's sampled tokens, still on the device: request -> its row of `token_ids`."""

    rows: dict[Request, int]
    token_ids: torch.Tensor  # [num_sampled] int64 on the device


def build_forward_batch(
    scheduled: ScheduledBatch,
    kv_cache: list[torch.Tensor],
    arch: ArchitectureSpec,
    backend: TorchBackend,
    residency: AdapterResidency | None = None,
    pending: PendingTokens | None = None,
) -> tuple[ForwardBatch, list[int]]:
    """Returns the batch and the positions in `scheduled.requests` of the requests that sample.

    The step's slots become one padded table and its LoRA metadata flat tensors, both built here once
    for all layers. A request's token that is not on the host yet (`Request.pending_tokens`) is read
    from `pending` on the device. Every host table reaches the device without waiting for it (pinned
    copies), so this can run while the last step still computes.
    """
    device = kv_cache[0].device
    input_ids: list[int] = []
    positions: list[int] = []
    new_slots: list[np.ndarray] = []
    query_starts: list[int] = []
    context_slots: list[np.ndarray] = []
    logits_indices: list[int] = []
    sampling: list[int] = []
    pending_positions: list[int] = []  # flat positions of tokens that `pending` holds, and their rows there
    pending_rows: list[int] = []
    adapter_tokens: dict[str, list[int]] = {}
    for i, (request, num_new) in enumerate(zip(scheduled.requests, scheduled.num_new_tokens)):
        start = request.num_computed_tokens
        end = start + num_new
        query_starts.append(len(input_ids))
        if request.adapter is not None:
            adapter_tokens.setdefault(request.adapter, []).extend(range(len(input_ids), len(input_ids) + num_new))
        known = min(end, request.num_known_tokens)
        input_ids.extend(request.token_ids_between(start, known))
        if known < end:  # the token sampled last step: a placeholder here, filled from the device below
            pending_positions.append(len(input_ids))
            pending_rows.append(pending.rows[request])
            input_ids.append(0)
        positions.extend(range(start, end))
        new_slots.append(request.slot_ids.view(start, end))
        context_slots.append(request.slot_ids.view(0, end))
        if end == request.num_tokens:  # the whole sequence is in the pool: its next token is due
            logits_indices.append(len(input_ids) - 1)
            sampling.append(i)
    slot_table = SlotTable.build(query_starts, list(scheduled.num_new_tokens), context_slots, device)
    slot_mapping = np.concatenate(new_slots) if new_slots else np.zeros(0, dtype=np.int32)
    tokens = int64_tensor(input_ids, device)
    if pending_positions:
        tokens[int64_tensor(pending_positions, device)] = pending.token_ids[int64_tensor(pending_rows, device)]
    attention = AttentionMetadata(int64_tensor(slot_mapping, device), slot_table, arch.config.head_dim**-0.5)
    batch = ForwardBatch(
        input_ids=tokens,
        positions=int64_tensor(positions, device),
        logits_indices=int64_tensor(logits_indices, device),
        attention=attention,
        kv_cache=kv_cache,
        backend=backend,
        lora=_lora_op(adapter_tokens, kv_cache, residency, arch, backend),
    )
    return batch, sampling


def _lora_op(adapter_tokens: dict[str, list[int]], kv_cache: list[torch.Tensor], residency: AdapterResidency | None,
             arch: ArchitectureSpec, backend: TorchBackend) -> LoRAOp | None:
    if not adapter_tokens:
        return None
    adapters = [residency.get(name) for name in adapter_tokens]
    lora = LoRABatch.from_lists(adapters, list(adapter_tokens.values()), arch.num_layers, len(arch.targets),
                                kv_cache[0].device)
    return backend.lora_op(kv_cache, lora)
