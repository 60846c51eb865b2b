"""Turns one step's scheduled requests into the flat tensors the model and kernels read.

This is the only place that knows both a request's state and the tensors' layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slora.config import ABLATION_KERNELS, BACKENDS, triton_lora_form
from slora.engine.request import Request
from slora.engine.scheduler import ScheduledBatch
from slora.kernels.lora import AdapterTokens, LoRABatch, TorchLoRA
from slora.kernels.lora_ablations import PaddedBmmLoRA
from slora.kernels.metadata import AttentionMetadata, ForwardBatch, LoRADelta, SlotTable, int64_tensor
from slora.lora.residency import AdapterResidency


@dataclass
class PendingTokens:
    """The last step's sampled tokens, still on the device: request -> its row of `token_ids`."""

    rows: dict[Request, int]
    token_ids: torch.Tensor  # [num_sampled] int64 on the device


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The kernels to run: `backend` when given, else Triton on CUDA and the torch reference elsewhere."""
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def build_forward_batch(
    scheduled: ScheduledBatch,
    kv_cache: list[torch.Tensor],
    head_dim: int,
    device: torch.device,
    residency: AdapterResidency | None = None,
    backend: str | None = None,
    lora_kernel: str = "auto",
    pending: PendingTokens | None = None,
) -> tuple[ForwardBatch, list[int]]:
    """Returns the batch and the positions in `scheduled.requests` of the requests that sample.

    `backend` None means Triton on CUDA and torch elsewhere; Triton also gets the step's slots as
    one padded table and its LoRA metadata as flat tensors, both built here once for all layers.
    A request's token that is not on the host yet (`Request.pending_tokens`) is read from `pending`
    on the device. Every host table reaches the device without waiting for it (pinned copies), so
    this can run while the last step still computes.
    """
    device = torch.device(device)
    backend = resolve_backend(backend, device)
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
    if backend == "triton":  # one padded table, which is all the Triton kernels read
        slot_table = SlotTable.build(query_starts, list(scheduled.num_new_tokens), context_slots, device)
        sequence_slots = None
    else:
        slot_table = None
        sequence_slots = [int64_tensor(slots, device) for slots in context_slots]
    slot_mapping = np.concatenate(new_slots) if new_slots else np.zeros(0, dtype=np.int32)
    tokens = int64_tensor(input_ids, device)
    if pending_positions:
        tokens[int64_tensor(pending_positions, device)] = pending.token_ids[int64_tensor(pending_rows, device)]
    attention = AttentionMetadata(
        slot_mapping=int64_tensor(slot_mapping, device),
        query_starts=query_starts,
        query_lens=list(scheduled.num_new_tokens),
        context_slots=sequence_slots,
        scale=head_dim**-0.5,
        slot_table=slot_table,
    )
    batch = ForwardBatch(
        input_ids=tokens,
        positions=int64_tensor(positions, device),
        logits_indices=int64_tensor(logits_indices, device),
        attention=attention,
        kv_cache=kv_cache,
        lora=_lora_op(adapter_tokens, kv_cache, residency, device, backend, lora_kernel),
        backend=backend,
    )
    return batch, sampling


def _lora_op(adapter_tokens: dict[str, list[int]], kv_cache: list[torch.Tensor], residency: AdapterResidency | None,
             device: torch.device, backend: str, lora_kernel: str) -> LoRADelta | None:
    if not adapter_tokens:
        return None
    adapters = [residency.get(name) for name in adapter_tokens]
    if lora_kernel in ABLATION_KERNELS or backend == "triton":  # both read the step's flat tables
        lora_batch = LoRABatch.from_lists(adapters, list(adapter_tokens.values()), len(kv_cache), device)
        if lora_kernel in ABLATION_KERNELS:
            return PaddedBmmLoRA(kv_cache, lora_batch, "token" if lora_kernel == "bmm" else "adapter")
        from slora.kernels.triton_lora import TritonLoRA  # Triton only where it is asked for

        return TritonLoRA(kv_cache, lora_batch, form=triton_lora_form(lora_kernel))
    groups = [AdapterTokens(adapter, int64_tensor(tokens, device))
              for adapter, tokens in zip(adapters, adapter_tokens.values())]
    return TorchLoRA(kv_cache, groups)
