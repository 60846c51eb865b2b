"""The batched LoRA op on the unified pool in Triton: adapters of different ranks, one launch per op.

Same contract as `lora.py` (`y[t] += s_a * (x[t] @ A_a^T) @ B_a^T`), same weights read in place
through the row tables, one launch for the whole batch per (layer, module) and op, in two forms:

- segment form (S-LoRA's MBGMM): program (adapter j, token split, tile) walks its adapter's tokens
  (`LoRABatch` groups them by adapter) in blocks of BLOCK_M, multiplying each block with a tile of
  the adapter's A or B^T by `tl.dot`; an adapter's weights are read once per token block.
- token form (MBGMV): program (token, tile) gathers its own adapter's rows and reduces without
  `tl.dot`, so a lone decode token costs no padding of the token axis to 16.

Ranks differ per adapter and nothing is padded to the batch's largest rank: shrink's rank tiles past
an adapter's rank exit at once and expand's rank loop stops at the adapter's rank. `shrink` writes
`v` in float32 (`[num_lora_tokens, >= max rank]`, rows in `LoRABatch.token_indices` order); `expand`
accumulates in float32 and adds into `y` in its own dtype.

Pool rows are `kv_dim` wide and a canonical row of A (or B^T) spans `chunks` pool rows, each
anywhere in the pool. Feature tiles never straddle a chunk (BLOCK_K and BLOCK_N divide kv_dim), so
a tile needs one row id per rank row, loaded from the row table as it goes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from slora.kernels import triton_interpreter
from slora.kernels.triton_interpreter import dot, dot_mode
from slora.kernels.lora import MODULE_INDEX, LoRABatch

triton_interpreter.patch()


@triton.jit
def _shrink_segments(x_ptr, stride_x, rows_ptr, row_table_ptr, a_offsets_ptr, ranks_ptr, token_indices_ptr,
                     segment_starts_ptr, v_ptr, stride_v, in_features, kv_dim, a_chunks, k_per_split, num_m_splits,
                     BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                     DOT_MODE: tl.constexpr):
    j = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_r = tl.program_id(2) // SPLIT_K
    pid_k = tl.program_id(2) % SPLIT_K
    rank = tl.load(ranks_ptr + j)
    if pid_r * BLOCK_R >= rank:
        return
    segment_start = tl.load(segment_starts_ptr + j)
    segment_end = tl.load(segment_starts_ptr + j + 1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_rows = tl.load(a_offsets_ptr + j) + offs_r * a_chunks  # row-table index of each rank row's chunk 0
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)
    offs_bk = tl.arange(0, BLOCK_K)
    for m0 in range(segment_start + pid_m * BLOCK_M, segment_end, num_m_splits * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < segment_end
        tokens = tl.load(token_indices_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            chunk = k0 // kv_dim
            row_ids = tl.load(row_table_ptr + a_rows + chunk, mask=r_mask, other=0).to(tl.int64)
            k_mask = k0 + offs_bk < k_end
            x = tl.load(x_ptr + tokens[:, None] * stride_x + (k0 + offs_bk)[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            a = tl.load(rows_ptr + row_ids[:, None] * kv_dim + (k0 - chunk * kv_dim) + offs_bk[None, :],
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc += dot(x, tl.trans(a.to(x.dtype)), DOT_MODE)
        out = v_ptr + offs_m[:, None].to(tl.int64) * stride_v + offs_r[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc, mask=m_mask[:, None] & r_mask[None, :])
        else:
            tl.atomic_add(out, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_segments(y_ptr, stride_y, v_ptr, stride_v, rows_ptr, row_table_ptr, b_offsets_ptr, ranks_ptr,
                     scalings_ptr, token_indices_ptr, segment_starts_ptr, out_features, kv_dim, b_chunks,
                     num_m_splits, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_MODE: tl.constexpr):
    j = tl.program_id(0)
    pid_m = tl.program_id(1)
    n0 = tl.program_id(2) * BLOCK_N
    rank = tl.load(ranks_ptr + j)
    if rank == 0:
        return
    scaling = tl.load(scalings_ptr + j)
    segment_start = tl.load(segment_starts_ptr + j)
    segment_end = tl.load(segment_starts_ptr + j + 1)
    chunk = n0 // kv_dim
    offs_bn = tl.arange(0, BLOCK_N)
    n_mask = n0 + offs_bn < out_features
    b_rows = tl.load(b_offsets_ptr + j) + chunk
    for m0 in range(segment_start + pid_m * BLOCK_M, segment_end, num_m_splits * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < segment_end
        tokens = tl.load(token_indices_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            v = tl.load(v_ptr + offs_m[:, None].to(tl.int64) * stride_v + offs_r[None, :],
                        mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            row_ids = tl.load(row_table_ptr + b_rows + offs_r * b_chunks, mask=r_mask, other=0).to(tl.int64)
            b = tl.load(rows_ptr + row_ids[:, None] * kv_dim + (n0 - chunk * kv_dim) + offs_bn[None, :],
                        mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            acc += dot(v.to(b.dtype), b, DOT_MODE)
        y_ptrs = y_ptr + tokens[:, None] * stride_y + (n0 + offs_bn)[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + scaling * acc).to(y.dtype), mask=mask)


@triton.jit
def _shrink_tokens(x_ptr, stride_x, rows_ptr, row_table_ptr, a_offsets_ptr, ranks_ptr, token_indices_ptr,
                   token_adapters_ptr, v_ptr, stride_v, in_features, kv_dim, a_chunks, k_per_split,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    position = tl.program_id(0)
    pid_r = tl.program_id(1) // SPLIT_K
    pid_k = tl.program_id(1) % SPLIT_K
    j = tl.load(token_adapters_ptr + position)
    rank = tl.load(ranks_ptr + j)
    if pid_r * BLOCK_R >= rank:
        return
    token = tl.load(token_indices_ptr + position).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_rows = tl.load(a_offsets_ptr + j) + offs_r * a_chunks
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)
    offs_bk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        chunk = k0 // kv_dim
        row_ids = tl.load(row_table_ptr + a_rows + chunk, mask=r_mask, other=0).to(tl.int64)
        k_mask = k0 + offs_bk < k_end
        x = tl.load(x_ptr + token * stride_x + k0 + offs_bk, mask=k_mask, other=0.0)
        a = tl.load(rows_ptr + row_ids[:, None] * kv_dim + (k0 - chunk * kv_dim) + offs_bk[None, :],
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    out = v_ptr + position.to(tl.int64) * stride_v + offs_r
    if SPLIT_K == 1:
        tl.store(out, acc, mask=r_mask)
    else:
        tl.atomic_add(out, acc, mask=r_mask)


@triton.jit
def _expand_tokens(y_ptr, stride_y, v_ptr, stride_v, rows_ptr, row_table_ptr, b_offsets_ptr, ranks_ptr,
                   scalings_ptr, token_indices_ptr, token_adapters_ptr, out_features, kv_dim, b_chunks,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    position = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    j = tl.load(token_adapters_ptr + position)
    rank = tl.load(ranks_ptr + j)
    if rank == 0:
        return
    scaling = tl.load(scalings_ptr + j)
    token = tl.load(token_indices_ptr + position).to(tl.int64)
    chunk = n0 // kv_dim
    offs_bn = tl.arange(0, BLOCK_N)
    n_mask = n0 + offs_bn < out_features
    b_rows = tl.load(b_offsets_ptr + j) + chunk
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        v = tl.load(v_ptr + position.to(tl.int64) * stride_v + offs_r, mask=r_mask, other=0.0)
        row_ids = tl.load(row_table_ptr + b_rows + offs_r * b_chunks, mask=r_mask, other=0).to(tl.int64)
        b = tl.load(rows_ptr + row_ids[:, None] * kv_dim + (n0 - chunk * kv_dim) + offs_bn[None, :],
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.sum(v[:, None] * b.to(tl.float32), axis=0)
    y_ptrs = y_ptr + token * stride_y + n0 + offs_bn
    y = tl.load(y_ptrs, mask=n_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + scaling * acc).to(y.dtype), mask=n_mask)


@dataclass(frozen=True)
class LoRAKernelConfig:
    """Block sizes and splits of one launch; `None` fields are chosen from the shapes (`choose_config`)."""

    block_m: int | None = None  # tokens per block (segment form)
    block_r: int | None = None  # rank rows per tile
    block_k: int | None = None  # input features per step of shrink (divides kv_dim)
    block_n: int | None = None  # output features per tile of expand (divides kv_dim)
    split_k: int | None = None  # shrink programs along the input features (atomic adds into v)
    m_splits: int | None = None  # programs along one segment's tokens (segment form)
    num_warps: int | None = None


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def choose_config(op: str, form: str, batch: LoRABatch, features: int, max_rank: int, kv_dim: int,
                  device: torch.device, given: LoRAKernelConfig | None = None) -> LoRAKernelConfig:
    """Fill the unset fields of `given` for one launch. `features` is in (shrink) or out (expand).

    On CUDA: enough programs to cover the SMs (split-K for shrink, token splits for long
    segments). Under the CPU interpreter programs run one after another: few, large blocks.
    """
    given = given or LoRAKernelConfig()
    feature_block = kv_dim & -kv_dim  # the largest power of two dividing kv_dim
    on_cuda = device.type == "cuda"
    max_segment = max(1, batch.max_segment_len)
    block_m = given.block_m or _clamp(_pow2_at_least(max_segment), 16, 64)
    if op == "shrink":
        block_r = given.block_r or _clamp(_pow2_at_least(max_rank), 16, 64 if on_cuda else 128)
    else:
        block_r = given.block_r or (16 if on_cuda else _clamp(_pow2_at_least(max_rank), 16, 128))
    block_k = min(given.block_k or (256 if form == "token" else 128), feature_block, _pow2_at_least(features))
    block_n = min(given.block_n or (128 if on_cuda else 256), feature_block, _pow2_at_least(features))
    m_splits = given.m_splits or (min(triton.cdiv(max_segment, block_m), 1024) if on_cuda else 1)
    split_k = given.split_k
    if split_k is None:
        split_k = 1
        if on_cuda and op == "shrink":
            rank_tiles = triton.cdiv(max_rank, block_r)
            units = batch.num_tokens if form == "token" else len(batch.adapters) * m_splits
            target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
            split_k = _clamp(triton.cdiv(target, units * rank_tiles), 1, triton.cdiv(features, block_k))
    num_warps = given.num_warps or 4
    return LoRAKernelConfig(block_m, block_r, block_k, block_n, split_k, m_splits, num_warps)


def _plan(kind: str, form: str, batch: LoRABatch, rows: torch.Tensor, layer: int, module: str,
          config: LoRAKernelConfig | None):
    """(module index, max rank, row shape, launch config) of one (layer, module); None if no token needs it."""
    m = MODULE_INDEX[module]
    max_rank = batch.max_ranks[layer][m]
    if max_rank == 0 or batch.num_tokens == 0:
        return None
    shape = batch.module_rows[module]
    features = shape.in_features if kind == "shrink" else shape.out_features
    return m, max_rank, shape, choose_config(kind, form, batch, features, max_rank, rows.shape[1], rows.device, config)


def shrink(x: torch.Tensor, rows: torch.Tensor, batch: LoRABatch, layer: int, module: str, v: torch.Tensor,
           form: str = "segment", config: LoRAKernelConfig | None = None) -> None:
    """`v[i, :r] = x[token i] @ A^T` for every LoRA token i of the batch (float32 `v`)."""
    plan = _plan("shrink", form, batch, rows, layer, module, config)
    if plan is None:
        return
    m, max_rank, shape, c = plan
    kv_dim = rows.shape[1]
    k_per_split = triton.cdiv(triton.cdiv(shape.in_features, c.split_k), c.block_k) * c.block_k
    split_k = triton.cdiv(shape.in_features, k_per_split)
    if split_k > 1:
        v.zero_()
    rank_tiles = triton.cdiv(max_rank, c.block_r)
    common = (rows, batch.row_table, batch.a_offsets[m], batch.ranks[layer, m], batch.token_indices)
    if form == "segment":
        grid = (len(batch.adapters), c.m_splits, rank_tiles * split_k)
        _shrink_segments[grid](x, x.stride(0), *common, batch.segment_starts, v, v.stride(0), shape.in_features,
                               kv_dim, shape.a_chunks, k_per_split, c.m_splits, BLOCK_M=c.block_m,
                               BLOCK_R=c.block_r, BLOCK_K=c.block_k, SPLIT_K=split_k,
                               DOT_MODE=dot_mode(x.dtype), num_warps=c.num_warps)
    else:
        grid = (batch.num_tokens, rank_tiles * split_k)
        _shrink_tokens[grid](x, x.stride(0), *common, batch.token_adapters, v, v.stride(0), shape.in_features,
                             kv_dim, shape.a_chunks, k_per_split, BLOCK_R=c.block_r, BLOCK_K=c.block_k,
                             SPLIT_K=split_k, num_warps=c.num_warps)


def expand(y: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, batch: LoRABatch, layer: int, module: str,
           form: str = "segment", config: LoRAKernelConfig | None = None) -> None:
    """`y[token i] += s * v[i, :r] @ B^T` in place, for every LoRA token i of the batch."""
    plan = _plan("expand", form, batch, rows, layer, module, config)
    if plan is None:
        return
    m, _, shape, c = plan
    kv_dim = rows.shape[1]
    n_tiles = triton.cdiv(shape.out_features, c.block_n)
    common = (rows, batch.row_table, batch.b_offsets[m], batch.ranks[layer, m], batch.scalings[layer, m],
              batch.token_indices)
    if form == "segment":
        grid = (len(batch.adapters), c.m_splits, n_tiles)
        _expand_segments[grid](y, y.stride(0), v, v.stride(0), *common, batch.segment_starts, shape.out_features,
                               kv_dim, shape.b_chunks, c.m_splits, BLOCK_M=c.block_m, BLOCK_R=c.block_r,
                               BLOCK_N=c.block_n, DOT_MODE=dot_mode(rows.dtype), num_warps=c.num_warps)
    else:
        grid = (batch.num_tokens, n_tiles)
        _expand_tokens[grid](y, y.stride(0), v, v.stride(0), *common, batch.token_adapters, shape.out_features,
                             kv_dim, shape.b_chunks, BLOCK_R=c.block_r, BLOCK_N=c.block_n, num_warps=c.num_warps)


class TritonLoRA:
    """`LoRADelta` for one step on the Triton kernels: same semantics as `TorchLoRA`.

    `form` is "segment", "token" or "auto" (the token form when every adapter has one token,
    as in a decode batch of distinct adapters; else the segment form).
    """

    def __init__(self, layers: list[torch.Tensor], batch: LoRABatch, form: str = "auto",
                 config: LoRAKernelConfig | None = None):
        if form not in ("auto", "segment", "token"):
            raise ValueError(f"LoRA kernel form must be 'auto', 'segment' or 'token', got {form!r}")
        self.layers = layers
        self.batch = batch
        self.form = form if form != "auto" else ("token" if batch.max_segment_len <= 1 else "segment")
        self.config = config
        max_rank = max((max(ranks) for ranks in batch.max_ranks), default=0)
        # One float32 buffer for the shrink results of every (layer, module): launches are in order.
        self._v = torch.empty(batch.num_tokens, max(max_rank, 1), dtype=torch.float32, device=layers[0].device)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str) -> None:
        if self.batch.max_ranks[layer][MODULE_INDEX[module]] == 0:
            return
        if x.stride(-1) != 1 or y.stride(-1) != 1:
            raise ValueError(f"{module}: LoRA kernels need rows of x and y contiguous, got strides "
                             f"{x.stride()} and {y.stride()}")
        kv_layer = self.layers[layer]
        rows = kv_layer.view(-1, kv_layer.shape[-2] * kv_layer.shape[-1])
        shrink(x, rows, self.batch, layer, module, self._v, self.form, self.config)
        expand(y, self._v, rows, self.batch, layer, module, self.form, self.config)


__all__ = ["LoRAKernelConfig", "TritonLoRA", "choose_config", "expand", "shrink"]
