"""Turns one step's scheduled requests into the flat tensors the model and kernels read.

This is the only place that knows both a request's state and the tensors' layout.
"""

from __future__ import annotations

import torch

from slora.engine.scheduler import ScheduledBatch
from slora.kernels.lora import AdapterTokens, TorchLoRA
from slora.kernels.metadata import AttentionMetadata, ForwardBatch
from slora.lora.residency import AdapterResidency


def build_forward_batch(
    scheduled: ScheduledBatch,
    kv_cache: list[torch.Tensor],
    head_dim: int,
    device: torch.device,
    residency: AdapterResidency | None = None,
) -> tuple[ForwardBatch, list[int]]:
    """Returns the batch and the positions in `scheduled.requests` of the requests that sample."""
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    query_starts: list[int] = []
    context_slots: list[torch.Tensor] = []
    logits_indices: list[int] = []
    sampling: list[int] = []
    adapter_tokens: dict[str, list[int]] = {}
    for i, (request, num_new) in enumerate(zip(scheduled.requests, scheduled.num_new_tokens)):
        start = request.num_computed_tokens
        end = start + num_new
        query_starts.append(len(input_ids))
        if request.adapter is not None:
            adapter_tokens.setdefault(request.adapter, []).extend(range(len(input_ids), len(input_ids) + num_new))
        input_ids.extend(request.token_ids_between(start, end))
        positions.extend(range(start, end))
        slot_mapping.extend(request.slot_ids[start:end])
        context_slots.append(torch.tensor(request.slot_ids[:end], dtype=torch.int64, device=device))
        if end == request.num_tokens:  # the whole sequence is in the pool: its next token is due
            logits_indices.append(len(input_ids) - 1)
            sampling.append(i)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
    attention = AttentionMetadata(
        slot_mapping=as_tensor(slot_mapping),
        query_starts=query_starts,
        query_lens=list(scheduled.num_new_tokens),
        context_slots=context_slots,
        scale=head_dim**-0.5,
    )
    batch = ForwardBatch(
        input_ids=as_tensor(input_ids),
        positions=as_tensor(positions),
        logits_indices=as_tensor(logits_indices),
        attention=attention,
        kv_cache=kv_cache,
        lora=_lora_op(adapter_tokens, kv_cache, residency, device),
    )
    return batch, sampling


def _lora_op(adapter_tokens: dict[str, list[int]], kv_cache: list[torch.Tensor],
             residency: AdapterResidency | None, device: torch.device) -> TorchLoRA | None:
    if not adapter_tokens:
        return None
    groups = [AdapterTokens(residency.get(name), torch.tensor(tokens, dtype=torch.int64, device=device))
              for name, tokens in adapter_tokens.items()]
    return TorchLoRA(kv_cache, groups)
