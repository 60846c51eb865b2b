"""Paged attention over the unified pool in Triton: same signature and semantics as `attention.py`.

K/V are read in place from the pool (`[num_slots, 2, kv_heads, head_dim]` per layer) through the
step's `SlotTable` (each sequence's slots, padded into one tensor, built once per step).

- prefill: program (work item (sequence, query block), head) runs a flash-attention loop (online softmax) over
  the sequence's keys up to the causal limit of its last query. Queries are the last `query_len`
  positions of the context, so a prefix already in the pool (chunked prefill) is served too. In a
  mixed step the decoding sequences (one query each) go to the decode kernel instead: on an H100, a
  step of 254 decode and 22 to 700 prefill tokens spent 29 ms in a prefill launch over all of them.
- decode (every sequence has one new token): program (sequence, KV head, split) computes the
  query heads that share one KV head together (GQA: each K/V row is read once for the group), over
  one stretch of the context; with more than one split (flash-decoding, for long contexts and few
  sequences) a second kernel merges the splits by their log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slora.kernels import triton_interpreter
from slora.kernels.triton_interpreter import dot, dot_mode
from slora.kernels.attention import write_kv
from slora.kernels.metadata import AttentionMetadata, SlotTable

triton_interpreter.patch()

_LOG2E = 1.4426950408889634
MAX_DECODE_SPLITS = 64  # flash-decoding splits of one context (the merge reads them in one block)
# Integer arguments that change from step to step: never specialized, so that a new batch never
# compiles a kernel again (Triton specializes integers on "equals 1" and "divisible by 16").
_STEP_INTS = ("stride_table", "split_len", "num_splits")
# A mixed step's prefill launch reads rows past the decoding ones: views whose start moves with the
# batch. Their per-sequence arrays are read one value at a time, so alignment gains nothing there; the
# slot table's rows stay aligned (its width is a multiple of 16).
_ROW_VIEWS = ("context_lens_ptr", "query_starts_ptr", "query_lens_ptr")


@triton.jit
def _attend_block(q, k_base, table, n0, key_end, positions, offs_d, d_mask, stride_slot, stride_kv, qk_scale,
                  m_i, l_i, acc, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_MODE: tl.constexpr):
    """One block of keys of the online softmax (scores in the log2 domain): returns the new m, l, acc.

    Keys `[n0, n0 + BLOCK_N)` below `key_end` are read through the slot table; with CAUSAL, query
    row i only sees keys at or before `positions[i]`.
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < key_end
    slots = tl.load(table + offs_n, mask=n_mask, other=0).to(tl.int64)
    k = tl.load(k_base + slots[None, :] * stride_slot + offs_d[:, None],
                mask=n_mask[None, :] & d_mask[:, None], other=0.0)
    scores = dot(q, k.to(q.dtype), DOT_MODE) * qk_scale
    if CAUSAL:
        visible = (offs_n[None, :] <= positions[:, None]) & n_mask[None, :]
    else:
        visible = n_mask[None, :]
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    p = tl.exp2(scores - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(k_base + stride_kv + slots[:, None] * stride_slot + offs_d[None, :],
                mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_MODE)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=_STEP_INTS, do_not_specialize_on_alignment=_ROW_VIEWS)
def _prefill(q_ptr, o_ptr, kv_ptr, slots_ptr, context_lens_ptr, query_starts_ptr, query_lens_ptr, items_ptr,
             stride_qt, stride_qh, stride_ot, stride_oh, stride_slot, stride_kv, stride_kvh, stride_table,
             qk_scale, head_dim, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, DOT_MODE: tl.constexpr):
    seq = tl.load(items_ptr + 2 * tl.program_id(0))  # work item: (sequence, query block)
    q_block = tl.load(items_ptr + 2 * tl.program_id(0) + 1)
    head = tl.program_id(1)
    query_len = tl.load(query_lens_ptr + seq)
    if q_block * BLOCK_M >= query_len:
        return
    context_len = tl.load(context_lens_ptr + seq)
    query_start = tl.load(query_starts_ptr + seq)
    offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < query_len
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    tokens = (query_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    positions = context_len - query_len + offs_m  # each query's place in its context
    key_end = tl.minimum(context_len, context_len - query_len + (q_block + 1) * BLOCK_M)
    k_base = kv_ptr + (head // GROUP) * stride_kvh
    table = slots_ptr + seq.to(tl.int64) * stride_table
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, key_end, BLOCK_N):
        m_i, l_i, acc = _attend_block(q, k_base, table, n0, key_end, positions, offs_d, d_mask, stride_slot,
                                      stride_kv, qk_scale, m_i, l_i, acc, BLOCK_N, True, DOT_MODE)
    out = acc / l_i[:, None]
    tl.store(o_ptr + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=_STEP_INTS)
def _decode(q_ptr, o_ptr, partial_o_ptr, partial_lse_ptr, kv_ptr, slots_ptr, context_lens_ptr, query_starts_ptr,
            stride_qt, stride_qh, stride_ot, stride_oh, stride_slot, stride_kv, stride_kvh, stride_table,
            qk_scale, head_dim, num_heads, split_len, num_splits, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_MODE: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    token = tl.load(query_starts_ptr + seq).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q = tl.load(q_ptr + token * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = kv_ptr + kv_head * stride_kvh
    table = slots_ptr + seq.to(tl.int64) * stride_table
    start = split * split_len
    end = tl.minimum(start + split_len, context_len)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        m_i, l_i, acc = _attend_block(q, k_base, table, n0, end, end, offs_d, d_mask, stride_slot,
                                      stride_kv, qk_scale, m_i, l_i, acc, BLOCK_N, False, DOT_MODE)
    if num_splits == 1:
        tl.store(o_ptr + token * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:  # an empty split (past the context) leaves l = 0 and lse = -inf: it weighs nothing in the merge
        row = (seq.to(tl.int64) * num_heads + heads) * num_splits + split
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        tl.store(partial_o_ptr + row[:, None] * head_dim + offs_d[None, :], acc / safe_l[:, None],
                 mask=g_mask[:, None] & d_mask[None, :])
        tl.store(partial_lse_ptr + row, tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf")), mask=g_mask)


@triton.jit(do_not_specialize=_STEP_INTS)
def _merge_splits(partial_o_ptr, partial_lse_ptr, o_ptr, query_starts_ptr, stride_ot, stride_oh, head_dim,
                  num_heads, num_splits, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_starts_ptr + seq).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    rows = (seq.to(tl.int64) * num_heads + head) * num_splits + offs_s
    lse = tl.load(partial_lse_ptr + rows, mask=s_mask, other=float("-inf"))
    weights = tl.exp2(lse - tl.max(lse, axis=0))
    parts = tl.load(partial_o_ptr + rows[:, None] * head_dim + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(weights[:, None] * parts, axis=0) / tl.sum(weights, axis=0)
    tl.store(o_ptr + token * stride_ot + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_mask)


def _kv_strides(kv_layer: torch.Tensor) -> tuple[int, int, int]:
    if kv_layer.stride(3) != 1:
        raise ValueError(f"the pool layer's head_dim must be contiguous, got strides {kv_layer.stride()}")
    return kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2)


def prefill(q: torch.Tensor, out: torch.Tensor, kv_layer: torch.Tensor, table: SlotTable, scale: float,
            block_m: int | None = None, block_n: int | None = None) -> None:
    """Causal attention of every sequence's queries to its context (prefix and new tokens)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // kv_layer.shape[2]
    block_m = block_m or prefill_block_m(table.max_query_len, q.device)
    block_n = block_n or 64
    items = table.prefill_items(block_m)
    if len(items) == 0:
        return
    _prefill[(len(items), num_heads)](
        q, out, kv_layer, table.slots, table.context_lens, table.query_starts, table.query_lens, items, q.stride(0),
        q.stride(1), out.stride(0), out.stride(1), *_kv_strides(kv_layer), table.slots.stride(0), scale * _LOG2E,
        head_dim, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        DOT_MODE=dot_mode(q.dtype), num_warps=4 if head_dim <= 64 else 8)


def prefill_block_m(max_query_len: int, device: torch.device) -> int:
    """Queries per prefill program: 64 on a GPU; under the interpreter, no more than the longest query needs."""
    return 64 if device.type == "cuda" else max(16, min(64, triton.next_power_of_2(max_query_len)))


def decode_splits(num_seqs: int, kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Splits along the context: enough programs to fill the GPU, none shorter than 256 keys."""
    if device.type != "cuda" or max_context_len <= 256:
        return 1
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(max_context_len, 256), triton.cdiv(programs, num_seqs * kv_heads), MAX_DECODE_SPLITS))


def decode(q: torch.Tensor, out: torch.Tensor, kv_layer: torch.Tensor, table: SlotTable, scale: float,
           num_splits: int | None = None, block_n: int | None = None) -> None:
    """Attention of each sequence's one new token to its whole context (GQA-aware, flash-decoding)."""
    num_seqs, (num_heads, head_dim), kv_heads = table.slots.shape[0], q.shape[1:], kv_layer.shape[2]
    group = num_heads // kv_heads
    num_splits = min(num_splits or decode_splits(num_seqs, kv_heads, table.max_context_len, q.device),
                     MAX_DECODE_SPLITS)
    block_n = block_n or 64
    split_len = triton.cdiv(triton.cdiv(table.max_context_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(table.max_context_len, split_len)
    if num_splits > 1:
        partial_o = torch.empty(num_seqs * num_heads * num_splits, head_dim, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(num_seqs * num_heads * num_splits, dtype=torch.float32, device=q.device)
    else:
        partial_o = partial_lse = out  # not read
    block_d = triton.next_power_of_2(head_dim)
    _decode[(num_seqs, kv_heads, num_splits)](
        q, out, partial_o, partial_lse, kv_layer, table.slots, table.context_lens, table.query_starts,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *_kv_strides(kv_layer), table.slots.stride(0),
        scale * _LOG2E, head_dim, num_heads, split_len, num_splits, GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d, DOT_MODE=dot_mode(q.dtype),
        num_warps=4)
    if num_splits > 1:
        _merge_splits[(num_seqs, num_heads)](
            partial_o, partial_lse, out, table.query_starts, out.stride(0), out.stride(1), head_dim, num_heads,
            num_splits, BLOCK_S=MAX_DECODE_SPLITS, BLOCK_D=block_d)


def attend_pool(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
                num_splits: int | None = None) -> torch.Tensor:
    """Attention of q ([T, H, D]) to each sequence's K/V already in the pool, new tokens' included."""
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    table = meta.slot_table
    if table.slots.shape[0] == 0:
        return out
    if table.max_query_len == 1:
        decode(q, out, kv_layer, table, meta.scale, num_splits)
        return out
    decoding, prompts = table.parts()
    if decoding is not None:  # a mixed step: its decoding sequences on the decode kernel
        decode(q, out, kv_layer, decoding, meta.scale, num_splits)
    prefill(q, out, kv_layer, prompts, meta.scale)
    return out


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                    meta: AttentionMetadata, num_splits: int | None = None) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] of the new tokens; returns [T, H, D] (as `attention.paged_attention`)."""
    write_kv(kv_layer, meta.slot_mapping, k, v)
    return attend_pool(q, kv_layer, meta, num_splits)


__all__ = ["attend_pool", "decode", "decode_splits", "paged_attention", "prefill"]
