"""Paged attention over the unified pool, torch reference version.

New tokens' K/V are written into their slots first; each sequence (a row of the step's `SlotTable`)
then attends to all of its slots (prefix already in the pool plus the new tokens) with a causal mask
aligned to the end of its context. This serves prefill, chunked prefill and decode alike, and is the oracle for the fast
kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slora.kernels.metadata import AttentionMetadata


def write_kv(kv_layer: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    kv_layer[slot_mapping, 0] = k.to(kv_layer.dtype)
    kv_layer[slot_mapping, 1] = v.to(kv_layer.dtype)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] of the new tokens; returns [T, H, D]."""
    write_kv(kv_layer, meta.slot_mapping, k, v)
    out = torch.empty_like(q)
    group = q.shape[1] // kv_layer.shape[2]
    table = meta.slot_table
    rows = zip(table.host_query_starts.tolist(), table.host_query_lens.tolist(), table.host_context_lens.tolist())
    for row, (start, length, context_len) in enumerate(rows):
        context = kv_layer[table.slots[row, :context_len].long()]  # [L, 2, KVH, D]
        keys = context[:, 0].repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
        values = context[:, 1].repeat_interleave(group, dim=1).transpose(0, 1)
        queries = q[start : start + length].transpose(0, 1)  # [H, Q, D]
        # Query i sits at context position L - Q + i and sees keys 0..that position.
        mask = torch.ones(length, context_len, dtype=torch.bool, device=q.device).tril(diagonal=context_len - length)
        attended = F.scaled_dot_product_attention(
            queries.float(), keys.float(), values.float(), attn_mask=mask, scale=meta.scale
        )
        out[start : start + length] = attended.transpose(0, 1).to(q.dtype)
    return out
