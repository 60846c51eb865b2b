"""The batched LoRA op on the unified pool in Triton: adapters of different ranks, one launch per op.

Same contract as `lora.py` (`y[t] += s_a * (x[t] @ A_a^T) @ B_a^T`), same weights read in place
through the row tables, one launch for the whole batch per (layer, projection) and op. A projection
is the linears of one input that the model runs as one GEMM (q/k/v, gate/up, or one alone): one
shrink launch reads x once for all of its modules' A, one expand launch writes all of their columns
of the GEMM's output. Two forms:

- segment form (S-LoRA's MBGMM): program (work item, module x split) walks blocks of BLOCK_M tokens
  of one adapter (`LoRABatch` groups tokens by adapter), multiplying each block with tiles of the
  adapter's A or B^T by `tl.dot`; an adapter's weights are read once per token block. A work item is
  (adapter j, i): a long segment gets several, a decode token's segment one (`LoRABatch.work_items`).
- token form (MBGMV): program (token, module x split) gathers its own adapter's rows and reduces
  without `tl.dot`.

Ranks differ per adapter and nothing is padded to the batch's largest rank: shrink's rank tiles past
an adapter's rank exit at once and expand's rank loop stops at the adapter's rank. Shrink splits the
input features over `split_k` programs that write separate float32 partials `v[p, split, i, :r]` (no
atomics, no zeroing launch); expand splits each module's output features over `n_splits` programs,
each looping over its BLOCK_N tiles, sums the splits as it reads `v` and adds into `y` in its own dtype
(an adapter of rank above BLOCK_R takes a slower loop that sums its rank tiles first, so that y is
rounded once whatever the rank).

On a GPU no serving step compiles a kernel: see `_BATCH_INTS` and `GPU_DEFAULTS`.

Pool rows are `kv_dim` wide and a canonical row of A (or B^T) spans `chunks` pool rows, each
anywhere in the pool. Feature tiles never straddle a chunk (BLOCK_K and BLOCK_N divide kv_dim), so
a tile needs one row id per rank row. The segment form loads those once per chunk, outside the loop
over the chunk's feature tiles: that loop's addresses are then affine in its index, and Triton
pipelines its loads (`cp.async`, `num_stages` deep). With the row ids loaded inside the tile loop,
as before, expand's loads were not pipelined at all and shrink's less well: the segment form took
27-28% longer for the q/k/v/o LoRA of 256 decode tokens on an H200
(bench/results/2026-12-01-h200-c6407e2). Expand's loop for ranks above BLOCK_R still loads them per
tile and is not pipelined; no benchmark case has such ranks, so it is untimed. Over blocks of 16
tokens, expand's y tile enters a product too (`identity @ y`), so that it is pipelined as well
(`PIPELINED_Y_MAX_BLOCK_M`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from slora.kernels import triton_interpreter
from slora.kernels.triton_interpreter import dot, dot_mode
from slora.architecture import Projection
from slora.kernels.lora import LoRABatch, pool_rows

triton_interpreter.patch()

MAX_SPLIT_K = 16
MAX_M_SPLITS = 1024  # segment form on a GPU: programs along one segment's tokens

# Integer arguments that change from batch to batch. Triton compiles a kernel again for every new
# combination of "equals 1" and "divisible by 16" of its integer arguments unless told not to; a new
# compile inside a serving step costs a second or more, so these are never specialized.
# Offsets that must stay provably aligned for 16-byte loads are passed in units the kernel multiplies
# back by a constexpr (K and N steps per split, v's strides in 16s).
_BATCH_INTS = ("table_width", "v_split16", "v_row16", "split_k", "k_steps", "rank_tiles", "max_m_splits", "n_splits",
               "n_steps")
# Pointers are specialized on 16-byte alignment too: a layer's rank and scaling tables are views at an
# offset that depends on the batch's width.
_BATCH_VIEWS = ("ranks_ptr", "scalings_ptr")


@triton.jit
def _shrink_program(pid, modules_ptr, ranks_ptr, a_offsets_ptr, j, table_width, rank_tiles, split_k,
                    BLOCK_R: tl.constexpr):
    """(module slot p, split, rank, first rank row of the tile, A's offset in the row table) of a shrink program."""
    p = pid // (rank_tiles * split_k)
    m = tl.load(modules_ptr + p)
    rank = tl.load(ranks_ptr + m * table_width + j)
    r0 = ((pid // split_k) % rank_tiles) * BLOCK_R
    return p, pid % split_k, rank, r0, tl.load(a_offsets_ptr + m * table_width + j)


@triton.jit
def _expand_program(pid, modules_ptr, columns_ptr, widths_ptr, b_chunks_ptr, b_offsets_ptr, ranks_ptr,
                    scalings_ptr, table_width, j, n_splits, n_steps, BLOCK_N: tl.constexpr,
                    WIDTH_UNIT: tl.constexpr):
    """(module slot p, rank, scaling, output features [n_start, n_end) within the module, the module's
    first column in y, B's offset in the row table, B chunks) of an expand program."""
    p = pid // n_splits
    m = tl.load(modules_ptr + p)
    n_start = (pid % n_splits) * n_steps * BLOCK_N
    n_end = tl.minimum(n_start + n_steps * BLOCK_N, tl.load(widths_ptr + p) * WIDTH_UNIT)
    return (p, tl.load(ranks_ptr + m * table_width + j), tl.load(scalings_ptr + m * table_width + j), n_start,
            n_end, tl.load(columns_ptr + p) * WIDTH_UNIT, tl.load(b_offsets_ptr + m * table_width + j),
            tl.load(b_chunks_ptr + p))


@triton.jit
def _v_rows(v_ptr, v_split16, v_row16, p, split_k, positions):
    """Where shrink's partials of module slot p (split 0) start for `positions`; the stride between splits."""
    split_stride = v_split16.to(tl.int64) * 16
    return v_ptr + (p * split_k) * split_stride + positions.to(tl.int64) * (v_row16 * 16), split_stride


@triton.jit
def _load_v(v_ptr, v_split16, v_row16, p, split_k, positions, offs_r, mask):
    """The shrink result of module slot p at `positions` x `offs_r`: the sum of its `split_k` partials."""
    rows, split_stride = _v_rows(v_ptr, v_split16, v_row16, p, split_k, positions)
    v = tl.load(rows + offs_r, mask=mask, other=0.0)
    for s in range(1, split_k):
        v += tl.load(rows + s * split_stride + offs_r, mask=mask, other=0.0)
    return v


@triton.jit
def _segment_item(items_ptr, segment_starts_ptr, max_m_splits, BLOCK_M: tl.constexpr):
    """(first token block, last token, stride between blocks) of the segment-form program for work item
    `tl.program_id(0)`: item (segment j, i) takes blocks i, i + s, i + 2s, ... of segment j, where s
    is the segment's own number of programs, min(its blocks, max_m_splits)."""
    item = tl.program_id(0)
    j = tl.load(items_ptr + 2 * item)
    segment_start = tl.load(segment_starts_ptr + j)
    segment_end = tl.load(segment_starts_ptr + j + 1)
    m_splits = tl.maximum(tl.minimum(tl.cdiv(segment_end - segment_start, BLOCK_M), max_m_splits), 1)
    return j, segment_start + tl.load(items_ptr + 2 * item + 1) * BLOCK_M, segment_end, m_splits * BLOCK_M


@triton.jit
def _chunk_rows(rows_ptr, row_table_ptr, table_rows, chunk, r_mask, kv_dim):
    """Pointers such that `base + f` is feature f (within `chunk`) of each rank row, whose chunk 0 is
    at `table_rows` in the row table."""
    row_ids = tl.load(row_table_ptr + table_rows + chunk, mask=r_mask, other=0).to(tl.int64)
    return rows_ptr + row_ids[:, None] * kv_dim - chunk * kv_dim


@triton.jit
def _b_tile(rows_ptr, row_table_ptr, b_rows, n0, offs_bn, r_mask, n_mask, kv_dim):
    """Columns `n0 + offs_bn` of the B^T rows whose chunk 0 is at `b_rows` in the row table."""
    chunk = n0 // kv_dim
    return tl.load(_chunk_rows(rows_ptr, row_table_ptr, b_rows, chunk, r_mask, kv_dim) + n0 + offs_bn[None, :],
                   mask=r_mask[:, None] & n_mask[None, :], other=0.0)


@triton.jit
def _add_to_y(y_rows, columns, m_mask, n_mask, scaling, acc):
    """y[rows, columns] += scaling * acc, in y's dtype."""
    y_ptrs = y_rows + columns[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + scaling * acc).to(y.dtype), mask=mask)


@triton.jit(do_not_specialize=_BATCH_INTS, do_not_specialize_on_alignment=_BATCH_VIEWS)
def _shrink_segments(x_ptr, stride_x, rows_ptr, row_table_ptr, a_offsets_ptr, ranks_ptr, modules_ptr, table_width,
                     token_indices_ptr, segment_starts_ptr, items_ptr, v_ptr, v_split16, v_row16, in_features, kv_dim,
                     a_chunks, k_steps, split_k, rank_tiles, max_m_splits, BLOCK_M: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_MODE: tl.constexpr):
    j, first_m, segment_end, m_stride = _segment_item(items_ptr, segment_starts_ptr, max_m_splits, BLOCK_M)
    p, pid_k, rank, r0, a_offset = _shrink_program(tl.program_id(1), modules_ptr, ranks_ptr, a_offsets_ptr, j,
                                                   table_width, rank_tiles, split_k, BLOCK_R)
    if r0 >= rank:
        return
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_rows = a_offset + offs_r * a_chunks  # row-table index of each rank row's chunk 0
    k_start = pid_k * k_steps * BLOCK_K
    k_end = tl.minimum(k_start + k_steps * BLOCK_K, in_features)
    offs_bk = tl.arange(0, BLOCK_K)
    for m0 in range(first_m, segment_end, m_stride):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < segment_end
        tokens = tl.load(token_indices_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        x_rows = x_ptr + tokens[:, None] * stride_x
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for chunk in range(k_start // kv_dim, tl.cdiv(k_end, kv_dim)):
            # The innermost loop's addresses are affine in k0, so Triton pipelines its loads (see the docstring).
            a_base = _chunk_rows(rows_ptr, row_table_ptr, a_rows, chunk, r_mask, kv_dim)
            chunk_end = tl.minimum(k_end, chunk * kv_dim + kv_dim)
            for k0 in range(tl.maximum(k_start, chunk * kv_dim), chunk_end, BLOCK_K):
                k_mask = k0 + offs_bk < chunk_end
                x = tl.load(x_rows + (k0 + offs_bk)[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                a = tl.load(a_base + (k0 + offs_bk)[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
                acc += dot(x, tl.trans(a.to(x.dtype)), DOT_MODE)
        out, split_stride = _v_rows(v_ptr, v_split16, v_row16, p, split_k, offs_m[:, None])
        tl.store(out + pid_k * split_stride + offs_r[None, :], acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit(do_not_specialize=_BATCH_INTS, do_not_specialize_on_alignment=_BATCH_VIEWS)
def _expand_segments(y_ptr, stride_y, v_ptr, v_split16, v_row16, split_k, rows_ptr, row_table_ptr, b_offsets_ptr,
                     ranks_ptr, scalings_ptr, modules_ptr, table_width, columns_ptr, widths_ptr, b_chunks_ptr,
                     token_indices_ptr, segment_starts_ptr, items_ptr, kv_dim, n_splits, n_steps, max_m_splits,
                     BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, WIDTH_UNIT: tl.constexpr,
                     DOT_MODE: tl.constexpr, Y_IN_PIPELINE: tl.constexpr):
    j, first_m, segment_end, m_stride = _segment_item(items_ptr, segment_starts_ptr, max_m_splits, BLOCK_M)
    p, rank, scaling, n_start, n_end, column, b_offset, b_chunks = _expand_program(
        tl.program_id(1), modules_ptr, columns_ptr, widths_ptr, b_chunks_ptr, b_offsets_ptr, ranks_ptr, scalings_ptr,
        table_width, j, n_splits, n_steps, BLOCK_N, WIDTH_UNIT)
    if rank == 0:
        return
    offs_bn = tl.arange(0, BLOCK_N)
    for m0 in range(first_m, segment_end, m_stride):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < segment_end
        tokens = tl.load(token_indices_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        y_rows = y_ptr + tokens[:, None] * stride_y + column
        if rank <= BLOCK_R:  # one rank tile: the tile loop is innermost, so that Triton pipelines its loads
            offs_r = tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            v = _load_v(v_ptr, v_split16, v_row16, p, split_k, offs_m[:, None], offs_r[None, :],
                        m_mask[:, None] & r_mask[None, :]).to(rows_ptr.dtype.element_ty)
            if Y_IN_PIPELINE:  # y's tile enters a product too (`identity @ y`), so that its load is pipelined
                block_rows = tl.arange(0, BLOCK_M)
                # (tl.where: Triton's interpreter casts a bool tensor to bfloat16 wrongly)
                identity = tl.where(block_rows[:, None] == block_rows[None, :], 1.0, 0.0).to(y_ptr.dtype.element_ty)
            for chunk in range(n_start // kv_dim, tl.cdiv(n_end, kv_dim)):
                b_base = _chunk_rows(rows_ptr, row_table_ptr, b_offset + offs_r * b_chunks, chunk, r_mask, kv_dim)
                chunk_end = tl.minimum(n_end, chunk * kv_dim + kv_dim)
                for n0 in range(tl.maximum(n_start, chunk * kv_dim), chunk_end, BLOCK_N):
                    n_mask = n0 + offs_bn < chunk_end
                    b = tl.load(b_base + (n0 + offs_bn)[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                    if Y_IN_PIPELINE:
                        y_ptrs, y_mask = y_rows + (n0 + offs_bn)[None, :], m_mask[:, None] & n_mask[None, :]
                        y = (dot(identity, tl.load(y_ptrs, mask=y_mask, other=0.0), DOT_MODE)
                             + scaling * dot(v, b, DOT_MODE))
                        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=y_mask)
                    else:
                        # The product before y's load: with y loaded first, the loop took 28% longer on an H200.
                        _add_to_y(y_rows, n0 + offs_bn, m_mask, n_mask, scaling, dot(v, b, DOT_MODE))
        else:  # several rank tiles, summed in float32 before y is rounded once
            for n0 in range(n_start, n_end, BLOCK_N):
                n_mask = n0 + offs_bn < n_end
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for r0 in range(0, rank, BLOCK_R):
                    offs_r = r0 + tl.arange(0, BLOCK_R)
                    r_mask = offs_r < rank
                    v = _load_v(v_ptr, v_split16, v_row16, p, split_k, offs_m[:, None], offs_r[None, :],
                                m_mask[:, None] & r_mask[None, :])
                    b = _b_tile(rows_ptr, row_table_ptr, b_offset + offs_r * b_chunks, n0, offs_bn, r_mask, n_mask,
                                kv_dim)
                    acc += dot(v.to(b.dtype), b, DOT_MODE)
                _add_to_y(y_rows, n0 + offs_bn, m_mask, n_mask, scaling, acc)


@triton.jit(do_not_specialize=_BATCH_INTS, do_not_specialize_on_alignment=_BATCH_VIEWS)
def _shrink_tokens(x_ptr, stride_x, rows_ptr, row_table_ptr, a_offsets_ptr, ranks_ptr, modules_ptr, table_width,
                   token_indices_ptr, token_adapters_ptr, v_ptr, v_split16, v_row16, in_features, kv_dim, a_chunks,
                   k_steps, split_k, rank_tiles, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    position = tl.program_id(0)
    j = tl.load(token_adapters_ptr + position)
    p, pid_k, rank, r0, a_offset = _shrink_program(tl.program_id(1), modules_ptr, ranks_ptr, a_offsets_ptr, j,
                                                   table_width, rank_tiles, split_k, BLOCK_R)
    if r0 >= rank:
        return
    offs_r = r0 + tl.arange(0, BLOCK_R)
    token = tl.load(token_indices_ptr + position).to(tl.int64)
    r_mask = offs_r < rank
    a_rows = a_offset + offs_r * a_chunks
    k_start = pid_k * k_steps * BLOCK_K
    k_end = tl.minimum(k_start + k_steps * BLOCK_K, in_features)
    offs_bk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = k0 + offs_bk < k_end
        x = tl.load(x_ptr + token * stride_x + k0 + offs_bk, mask=k_mask, other=0.0)
        a_base = _chunk_rows(rows_ptr, row_table_ptr, a_rows, k0 // kv_dim, r_mask, kv_dim)
        a = tl.load(a_base + (k0 + offs_bk)[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    out, split_stride = _v_rows(v_ptr, v_split16, v_row16, p, split_k, position)
    tl.store(out + pid_k * split_stride + offs_r, acc, mask=r_mask)


@triton.jit(do_not_specialize=_BATCH_INTS, do_not_specialize_on_alignment=_BATCH_VIEWS)
def _expand_tokens(y_ptr, stride_y, v_ptr, v_split16, v_row16, split_k, rows_ptr, row_table_ptr, b_offsets_ptr,
                   ranks_ptr, scalings_ptr, modules_ptr, table_width, columns_ptr, widths_ptr, b_chunks_ptr,
                   token_indices_ptr, token_adapters_ptr, kv_dim, n_splits, n_steps, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr, WIDTH_UNIT: tl.constexpr):
    position = tl.program_id(0)
    j = tl.load(token_adapters_ptr + position)
    p, rank, scaling, n_start, n_end, column, b_offset, b_chunks = _expand_program(
        tl.program_id(1), modules_ptr, columns_ptr, widths_ptr, b_chunks_ptr, b_offsets_ptr, ranks_ptr, scalings_ptr,
        table_width, j, n_splits, n_steps, BLOCK_N, WIDTH_UNIT)
    if rank == 0:
        return
    y_row = y_ptr + tl.load(token_indices_ptr + position).to(tl.int64) * stride_y + column
    offs_bn = tl.arange(0, BLOCK_N)
    for n0 in range(n_start, n_end, BLOCK_N):
        n_mask = n0 + offs_bn < n_end
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            v = _load_v(v_ptr, v_split16, v_row16, p, split_k, position, offs_r, r_mask)
            b = _b_tile(rows_ptr, row_table_ptr, b_offset + offs_r * b_chunks, n0, offs_bn, r_mask, n_mask, kv_dim)
            acc += tl.sum(v[:, None] * b.to(tl.float32), axis=0)
        y = tl.load(y_row + n0 + offs_bn, mask=n_mask, other=0.0)
        tl.store(y_row + n0 + offs_bn, (y.to(tl.float32) + scaling * acc).to(y.dtype), mask=n_mask)


@dataclass(frozen=True)
class LoRAKernelConfig:
    """Block sizes and splits of one launch; `None` fields are chosen from the shapes (`choose_config`)."""

    block_m: int | None = None  # tokens per block (segment form)
    block_r: int | None = None  # rank rows per tile
    block_k: int | None = None  # input features per step of shrink (divides kv_dim)
    block_n: int | None = None  # output features per step of expand (divides kv_dim)
    split_k: int | None = None  # shrink programs along the input features (partials summed by expand)
    n_splits: int | None = None  # expand programs along each module's output features
    m_splits: int | None = None  # the most programs along one segment's tokens (segment form)
    num_warps: int | None = None
    num_stages: int | None = None  # None: Triton's default
    max_registers: int | None = None  # per thread (Triton's `maxnreg`); None: the compiler's choice


# On a GPU the compiled block sizes never depend on the batch (only grids and splits do, which are
# arguments): every launch is one of `compile_variants`, all compiled at start-up (`precompile`),
# so no serving step waits for a compile. The segment form's values come from the H200 sweep of the
# pipelined kernels at Llama-2-7B shapes (bench/results/2026-12-01-h200-c6407e2/kernels-check): the
# best for decode at 64 and 256 adapters; for a 1,920-token prefill, shrink is 6-8% off the best.
# The token form keeps untuned ones.
GPU_DEFAULTS = {
    ("shrink", "segment"): LoRAKernelConfig(block_r=32, block_k=128, num_warps=4, num_stages=3),
    ("shrink", "token"): LoRAKernelConfig(block_r=64, block_k=256, num_warps=4),
    ("expand", "segment"): LoRAKernelConfig(block_r=64, block_n=128, num_warps=4, num_stages=3),
    ("expand", "token"): LoRAKernelConfig(block_r=64, block_n=128, num_warps=4),
}
FORMS = ("segment", "token")  # see the module docstring
BLOCK_M_CHOICES = (16, 64)  # segment form: batches of mostly short segments (decode, mixed steps), of long ones
PROGRAMS_PER_SM = 4  # splits aim at this many programs per SM (expand's are then rounded down to a power of two)
# ... but expand over blocks of 64 tokens (prefill) at half as many: each program then does 4x the work per B
# tile. On the H200, a 1,920-token prefill's q/k/v expand took 46.7 us with 2 output splits against 51.7 with the
# 4 that 4 per SM gave, and o 24.9 us with 8 against 31.2 with 16 (bench/results/2026-12-01-h200-30dec53/structure).
EXPAND_LONG_BLOCK_PROGRAMS_PER_SM = 2
# Expand over blocks of up to this many tokens (decode, mixed steps) passes y's tiles through the pipeline
# (`Y_IN_PIPELINE`) and is held to EXPAND_PIPELINED_Y_REGISTERS registers a thread. Loaded in its own
# step, y's tile made every step wait a memory latency: through the pipeline the q/k/v/o LoRA of 256 decode
# tokens took 71.3 us instead of 76.2 at 64 adapters and 179.8 instead of 186.5 at 256 on the H200. Without
# the register cap the kernel took 164 registers, 3 programs an SM instead of 4, and o's expand lost what
# q/k/v's gained; over 64-token blocks y's stages doubled the shared memory and prefill took 16% longer
# (bench/results/2026-12-01-h200-0aa23f1/structure).
PIPELINED_Y_MAX_BLOCK_M = BLOCK_M_CHOICES[0]
EXPAND_PIPELINED_Y_REGISTERS = 128
# ... and never fewer than these on a GPU: 2 K splits were best in every case of the sweep, even where
# fewer already gave 4 programs per SM; 2 output splits where a module's programs fill a wave anyway
# (256 decode tokens of 256 adapters: 73.0 us for q/k/v's expand against 86.9 with 1).
GPU_MIN_SPLIT_K, GPU_MIN_N_SPLITS = 2, 2


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pow2_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def block_m_for(batch: LoRABatch) -> int:
    """Tokens per block of the segment form: 64 only where segments average over 32 tokens (prefill).
    A mixed step's decode tokens are segments of one, and 64-row blocks for each of them made the
    q/k/v/o LoRA of 254 decode tokens and one 400-token prompt take 560 us on an H100, twice the
    decode tokens alone."""
    long = batch.num_tokens > 2 * BLOCK_M_CHOICES[0] * max(1, batch.num_segments)
    return BLOCK_M_CHOICES[1] if long else BLOCK_M_CHOICES[0]


def choose_config(op: str, form: str, batch: LoRABatch, features: int, max_rank: int, kv_dim: int,
                  device: torch.device, given: LoRAKernelConfig | None = None,
                  num_modules: int = 1) -> LoRAKernelConfig:
    """Fill the unset fields of `given` for one launch over `num_modules` modules of `features`
    inputs (shrink) or outputs each (expand).

    On CUDA: `GPU_DEFAULTS`' block sizes, and enough programs to cover the SMs (split-K for shrink,
    output splits for expand, token splits for long segments). Under the CPU interpreter programs
    run one after another: few, large blocks, sized to the batch.
    """
    given = given or LoRAKernelConfig()
    sms = multiprocessors(device)
    defaults = GPU_DEFAULTS[(op, form)] if sms else LoRAKernelConfig(block_k=256 if form == "token" else 128,
                                                                      block_n=256, num_warps=4)
    feature_block = kv_dim & -kv_dim  # the largest power of two dividing kv_dim
    max_segment = max(1, batch.max_segment_len)
    block_m = given.block_m or block_m_for(batch)
    block_r = given.block_r or defaults.block_r or _clamp(_pow2_at_least(max_rank), 16, 128)
    block_k = min(given.block_k or defaults.block_k or 128, feature_block, _pow2_at_least(features))
    block_n = min(given.block_n or defaults.block_n or 128, feature_block, _pow2_at_least(features))
    m_splits = given.m_splits or (min(triton.cdiv(max_segment, block_m), MAX_M_SPLITS) if sms else 1)
    units = (batch.num_tokens if form == "token" else len(batch.work_items(block_m, m_splits))) * num_modules
    per_sm = EXPAND_LONG_BLOCK_PROGRAMS_PER_SM if op == "expand" and block_m > BLOCK_M_CHOICES[0] else PROGRAMS_PER_SM
    wave = per_sm * sms if sms else 0  # programs resident at once (see below)
    split_k, n_splits = 1, 1
    if op == "shrink" and sms:
        split_k = max(GPU_MIN_SPLIT_K, triton.cdiv(triton.cdiv(wave, units), triton.cdiv(max_rank, block_r)))
    elif sms:
        # A power of two of output splits, as many as fit in one wave of `per_sm` programs an SM (as many as
        # are resident at once: 4 of the 16-token kernel's 128 registers, 2 of the 64-token one's) while the
        # units alone are fewer, and GPU_MIN_N_SPLITS once they fill it. On the H200: 3 splits of a module's
        # 32 tiles took 14-23% longer than 2 where 2 were the best; rounding up past one wave instead (2
        # splits of q/k/v at 96 to 160 adapters of 256 decode tokens, a second wave part full) made the
        # q/k/v/o LoRA 2-5% slower than 1 split (bench/results/2026-12-01-h200-0aa23f1/structure).
        n_splits = _pow2_at_most(wave // units) if units <= wave else GPU_MIN_N_SPLITS
    split_k = _clamp(given.split_k or split_k, 1, min(MAX_SPLIT_K, triton.cdiv(features, block_k)))
    n_splits = _clamp(given.n_splits or n_splits, 1, triton.cdiv(features, block_n))
    n_splits = triton.cdiv(features, triton.cdiv(triton.cdiv(features, n_splits), block_n) * block_n)  # as launched
    return LoRAKernelConfig(block_m, block_r, block_k, block_n, split_k, n_splits, m_splits,
                            given.num_warps or defaults.num_warps, given.num_stages or defaults.num_stages,
                            given.max_registers or (_gpu_max_registers(op, form, block_m) if sms else None))


def expand_pipelines_y(form: str, block_m: int | None) -> bool:
    """Whether the expand kernel of `form` over blocks of `block_m` tokens loads y through its pipeline."""
    return form == "segment" and block_m is not None and block_m <= PIPELINED_Y_MAX_BLOCK_M


def _gpu_max_registers(op: str, form: str, block_m: int | None) -> int | None:
    return EXPAND_PIPELINED_Y_REGISTERS if op == "expand" and expand_pipelines_y(form, block_m) else None


def launch_options(config: LoRAKernelConfig) -> dict:
    """Triton's launch options of a configuration: warps, and stages and a register cap where set."""
    return {"num_warps": config.num_warps, **({"num_stages": config.num_stages} if config.num_stages else {}),
            **({"maxnreg": config.max_registers} if config.max_registers else {})}


_SM_COUNTS: dict[int, int] = {}


def multiprocessors(device: torch.device) -> int | None:
    """SMs of a CUDA device; None elsewhere (the interpreter), where launches are sized for the CPU."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


@dataclass(frozen=True)
class ProjectionTables:
    """Where each module of a projection lives, as the kernels read it (built once per shape)."""

    modules: torch.Tensor  # [P] int32: each module's index in the spec's targets (rows of the rank tables)
    columns: torch.Tensor  # [P] int32: each module's first column in the projection's output, in width units
    widths: torch.Tensor  # [P] int32: each module's output features, in width units
    b_chunks: torch.Tensor  # [P] int32: pool rows per canonical row of each module's B^T
    width_unit: int  # 16 when every module's width is a multiple of 16 (then loads of B and y are aligned), else 1


_TABLES: dict[tuple, ProjectionTables] = {}


def projection_tables(projection: Projection, kv_dim: int, device: torch.device) -> ProjectionTables:
    key = (projection, kv_dim, str(device))
    if key not in _TABLES:
        as_int32 = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
        unit = 16 if all(width % 16 == 0 for width in projection.widths) else 1
        _TABLES[key] = ProjectionTables(
            modules=as_int32(list(projection.targets)),
            columns=as_int32([start // unit for start in projection.starts]),
            widths=as_int32([width // unit for width in projection.widths]),
            b_chunks=as_int32([triton.cdiv(width, kv_dim) for width in projection.widths]), width_unit=unit)
    return _TABLES[key]


@dataclass
class Shrunk:
    """Shrink's output: `v[p * split_k + s, i, :r]`, partial sums of module slot p for LoRA token i."""

    v: torch.Tensor  # [P * split_k, num_lora_tokens, max rank rounded up to 16] float32
    split_k: int


def projection_max_rank(batch: LoRABatch, layer: int, projection: Projection) -> int:
    """The largest rank any adapter of the batch has on any module of the projection (0: nothing to do)."""
    if batch.num_tokens == 0:
        return 0
    return max(batch.max_ranks[layer][m] for m in projection.targets)


def shrink(x: torch.Tensor, rows: torch.Tensor, batch: LoRABatch, layer: int, projection: Projection,
           form: str = "segment", config: LoRAKernelConfig | None = None) -> Shrunk | None:
    """`x[token i] @ A^T` of every module of `projection`, for every LoRA token i; None if no adapter needs it."""
    max_rank = projection_max_rank(batch, layer, projection)
    if max_rank == 0:
        return None
    c = choose_config("shrink", form, batch, x.shape[1], max_rank, rows.shape[1], rows.device, config,
                      len(projection.modules))
    return _shrink(x, rows, batch, layer, projection, form, c, max_rank)


def _shrink(x: torch.Tensor, rows: torch.Tensor, batch: LoRABatch, layer: int, projection: Projection, form: str,
            c: LoRAKernelConfig, max_rank: int) -> Shrunk:
    num_modules, in_features, kv_dim = len(projection.modules), x.shape[1], rows.shape[1]
    k_steps = triton.cdiv(triton.cdiv(in_features, c.split_k), c.block_k)
    split_k = triton.cdiv(in_features, k_steps * c.block_k)
    # Rows of v padded to 16 floats, so that every row starts 64-byte aligned (and the kernels know it).
    v_row = triton.cdiv(max_rank, 16) * 16
    v = torch.empty(num_modules * split_k, batch.num_tokens, v_row, dtype=torch.float32, device=x.device)
    rank_tiles = triton.cdiv(max_rank, c.block_r)
    tables = projection_tables(projection, kv_dim, rows.device)
    common = (rows, batch.row_table, batch.a_offsets, batch.ranks[layer], tables.modules, batch.table_width,
              batch.token_indices)
    tail = (v, v.stride(0) // 16, v_row // 16, in_features, kv_dim, triton.cdiv(in_features, kv_dim), k_steps,
            split_k, rank_tiles)
    programs = num_modules * rank_tiles * split_k
    options = launch_options(c)
    if form == "segment":
        items = batch.work_items(c.block_m, c.m_splits)
        _shrink_segments[(len(items), programs)](
            x, x.stride(0), *common, batch.segment_starts, items, *tail, c.m_splits, BLOCK_M=c.block_m,
            BLOCK_R=c.block_r, BLOCK_K=c.block_k, DOT_MODE=dot_mode(x.dtype), **options)
    else:
        _shrink_tokens[(batch.num_tokens, programs)](
            x, x.stride(0), *common, batch.token_adapters, *tail, BLOCK_R=c.block_r, BLOCK_K=c.block_k, **options)
    return Shrunk(v, split_k)


def expand(y: torch.Tensor, shrunk: Shrunk, rows: torch.Tensor, batch: LoRABatch, layer: int,
           projection: Projection, form: str = "segment", config: LoRAKernelConfig | None = None) -> None:
    """`y[token i, module columns] += s * v[i, :r] @ B^T` in place, for every module and LoRA token i."""
    if shrunk.v.shape[-1] % 16 or shrunk.v.stride(1) != shrunk.v.shape[-1]:
        raise ValueError(f"v must be shrink's output, rows padded to 16 floats; got shape {tuple(shrunk.v.shape)}")
    c = choose_config("expand", form, batch, max(projection.widths), projection_max_rank(batch, layer, projection),
                      rows.shape[1], rows.device, config, len(projection.modules))
    _expand(y, shrunk, rows, batch, layer, projection, form, c)


def _expand(y: torch.Tensor, shrunk: Shrunk, rows: torch.Tensor, batch: LoRABatch, layer: int,
            projection: Projection, form: str, c: LoRAKernelConfig) -> None:
    kv_dim = rows.shape[1]
    tables = projection_tables(projection, kv_dim, rows.device)
    n_steps = triton.cdiv(triton.cdiv(max(projection.widths), c.n_splits), c.block_n)
    n_splits = triton.cdiv(max(projection.widths), n_steps * c.block_n)
    v = shrunk.v
    common = (y, y.stride(0), v, v.stride(0) // 16, v.stride(1) // 16, shrunk.split_k, rows, batch.row_table,
              batch.b_offsets, batch.ranks[layer], batch.scalings[layer], tables.modules, batch.table_width,
              tables.columns, tables.widths, tables.b_chunks, batch.token_indices)
    programs = len(projection.modules) * n_splits
    options = launch_options(c)
    if form == "segment":
        items = batch.work_items(c.block_m, c.m_splits)
        _expand_segments[(len(items), programs)](
            *common, batch.segment_starts, items, kv_dim, n_splits, n_steps, c.m_splits, BLOCK_M=c.block_m,
            BLOCK_R=c.block_r, BLOCK_N=c.block_n, WIDTH_UNIT=tables.width_unit, DOT_MODE=dot_mode(rows.dtype),
            Y_IN_PIPELINE=expand_pipelines_y(form, c.block_m), **options)
    else:
        _expand_tokens[(batch.num_tokens, programs)](
            *common, batch.token_adapters, kv_dim, n_splits, n_steps, BLOCK_R=c.block_r, BLOCK_N=c.block_n,
            WIDTH_UNIT=tables.width_unit, **options)


def launch_configs(form: str, batch: LoRABatch, projection: Projection, in_features: int, max_rank: int,
                   rows: torch.Tensor,
                   given: LoRAKernelConfig | None = None) -> tuple[LoRAKernelConfig, LoRAKernelConfig]:
    """(shrink, expand) configurations of one projection's launches over `rows` (a pool layer's rows)."""
    def choose(op: str, features: int) -> LoRAKernelConfig:
        return choose_config(op, form, batch, features, max_rank, rows.shape[1], rows.device, given,
                             len(projection.modules))

    return choose("shrink", in_features), choose("expand", max(projection.widths))


@dataclass
class _Started:
    """What `TritonLoRA.start` (shrink) hands to `finish` (expand)."""

    shrunk: Shrunk
    rows: torch.Tensor
    layer: int
    projection: Projection
    config: LoRAKernelConfig


class TritonLoRA:
    """`LoRAOp` for one step on the Triton kernels: same semantics as `TorchLoRA`.

    `form` is "segment" (the default) or "token". Launch configurations are chosen once per
    projection and largest rank, not once per layer.
    """

    def __init__(self, layers: list[torch.Tensor], batch: LoRABatch, form: str = "segment",
                 config: LoRAKernelConfig | None = None):
        if form not in FORMS:
            raise ValueError(f"LoRA kernel form must be one of {', '.join(FORMS)}, got {form!r}")
        self.layers = layers
        self.batch = batch
        self.form = form
        self.config = config
        self._configs: dict[tuple[Projection, int, int], tuple[LoRAKernelConfig, LoRAKernelConfig]] = {}

    def start(self, x: torch.Tensor, layer: int, projection: Projection) -> _Started | None:
        if x.stride(-1) != 1:
            raise ValueError(f"{'/'.join(projection.modules)}: LoRA kernels need rows of x contiguous, "
                             f"got strides {x.stride()}")
        max_rank = projection_max_rank(self.batch, layer, projection)
        if max_rank == 0:
            return None
        rows = pool_rows(self.layers[layer])
        key = (projection, x.shape[1], max_rank)
        if key not in self._configs:
            self._configs[key] = launch_configs(self.form, self.batch, projection, x.shape[1], max_rank, rows,
                                                self.config)
        shrink_config, expand_config = self._configs[key]
        shrunk = _shrink(x, rows, self.batch, layer, projection, self.form, shrink_config, max_rank)
        return _Started(shrunk, rows, layer, projection, expand_config)

    def finish(self, started: _Started, y: torch.Tensor) -> None:
        if y.stride(-1) != 1:
            raise ValueError(f"LoRA kernels need rows of y contiguous, got strides {y.stride()}")
        _expand(y, started.shrunk, started.rows, self.batch, started.layer, started.projection, self.form,
                started.config)


def compile_variants(form: str) -> list[tuple[str, LoRAKernelConfig]]:
    """Every (op, block sizes) a GPU launch of `form` can compile: `GPU_DEFAULTS` with each BLOCK_M."""
    blocks_m = BLOCK_M_CHOICES if form == "segment" else (None,)
    return [(op, replace(GPU_DEFAULTS[(op, form)], block_m=block_m,
                         max_registers=_gpu_max_registers(op, form, block_m)))
            for op in ("shrink", "expand") for block_m in blocks_m]


def precompile(kv_layer: torch.Tensor, projections: Iterable[Projection], num_modules: int,
               form: str = "segment") -> int:
    """Compile every kernel variant that serving steps of `form` can launch on this device, now, so
    that no step waits for a compile (a second or more each). `projections` are the model's, over
    an axis of `num_modules` modules. Launches over one adapter column of rank 0 (every program exits
    at once) with the model's shapes and dtypes, so the compiled variants are the ones steps use.
    Returns the number of launches made."""
    device, dtype = kv_layer.device, kv_layer.dtype
    rows = pool_rows(kv_layer)
    launches = 0
    for block_m in {config.block_m for _, config in compile_variants(form)}:
        batch = _empty_batch(1 if block_m is None else block_m, num_modules, device)  # a segment of BLOCK_M tokens
        for projection in projections:
            in_features = projection.in_features
            max_rank = projection_max_rank(batch, 0, projection)
            x = torch.zeros(batch.num_tokens, in_features, dtype=dtype, device=device)
            y = torch.zeros(batch.num_tokens, sum(projection.widths), dtype=dtype, device=device)
            shrink_config, expand_config = launch_configs(form, batch, projection, in_features, max_rank, rows)
            shrunk = _shrink(x, rows, batch, 0, projection, form, shrink_config, max_rank)
            _expand(y, shrunk, rows, batch, 0, projection, form, expand_config)
            launches += 2
    return launches


def _empty_batch(num_tokens: int, modules: int, device: torch.device) -> LoRABatch:
    """One segment of `num_tokens` tokens whose adapter has rank 0 everywhere (but is launched for)."""
    zeros = lambda *shape, dtype=torch.int32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    return LoRABatch(adapters=[], row_table=zeros(1), a_offsets=zeros(modules, 1), b_offsets=zeros(modules, 1),
                     ranks=zeros(1, modules, 1), scalings=zeros(1, modules, 1, dtype=torch.float32),
                     token_indices=torch.arange(num_tokens, dtype=torch.int32, device=device),
                     token_adapters=zeros(num_tokens), segment_starts=torch.tensor([0, num_tokens], dtype=torch.int32,
                                                                                    device=device),
                     max_ranks=[[1] * modules], max_segment_len=num_tokens)


__all__ = ["FORMS", "GPU_DEFAULTS", "LoRAKernelConfig", "Shrunk", "TritonLoRA", "choose_config", "compile_variants",
           "expand", "expand_pipelines_y", "launch_options", "precompile", "shrink"]
