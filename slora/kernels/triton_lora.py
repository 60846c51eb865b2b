"""The batched LoRA op on the unified pool in Triton: adapters of different ranks, one launch per op.

Same contract as `lora.py` (`y[t] += s_a * (x[t] @ A_a^T) @ B_a^T`), same weights read in place
through the row tables, one launch for the whole batch per (layer, projection) and op. A projection
is the linears of one input that the model runs as one GEMM (q/k/v, gate/up, or one alone): one
shrink launch reads x once for all of its modules' A, one expand launch writes all of their columns
of the GEMM's output. Two forms:

- segment form (S-LoRA's MBGMM): program (adapter j, token split, module x tile) walks its
  adapter's tokens (`LoRABatch` groups them by adapter) in blocks of BLOCK_M, multiplying each block
  with a tile of the adapter's A or B^T by `tl.dot`; an adapter's weights are read once per token block.
- token form (MBGMV): program (token, module x tile) gathers its own adapter's rows and reduces
  without `tl.dot`.

Ranks differ per adapter and nothing is padded to the batch's largest rank: shrink's rank tiles past
an adapter's rank exit at once and expand's rank loop stops at the adapter's rank. Shrink splits the
input features over SPLIT_K programs that write separate float32 partials `v[p, split, i, :r]` (no
atomics, no zeroing launch); expand sums the splits as it reads `v` and adds into `y` in its own dtype.

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
from slora.kernels.metadata import Projection

triton_interpreter.patch()

MAX_SPLIT_K = 16


@triton.jit
def _shrink_program(pid, modules_ptr, ranks_ptr, a_offsets_ptr, j, num_adapters, rank_tiles,
                    BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr):
    """(module slot p, split, rank, first rank row of the tile, A's offset in the row table) of a shrink program."""
    p = pid // (rank_tiles * SPLIT_K)
    m = tl.load(modules_ptr + p)
    rank = tl.load(ranks_ptr + m * num_adapters + j)
    r0 = ((pid // SPLIT_K) % rank_tiles) * BLOCK_R
    return p, pid % SPLIT_K, rank, r0, tl.load(a_offsets_ptr + m * num_adapters + j)


@triton.jit
def _expand_program(tile, modules_ptr, tile_starts_ptr, columns_ptr, b_chunks_ptr, ranks_ptr, num_adapters, j,
                    BLOCK_N: tl.constexpr, P: tl.constexpr):
    """(module slot p, module index, rank, first output feature within the module, its column in y,
    B chunks) of an expand program: tiles are numbered across the projection's modules."""
    p = 0
    for i in tl.static_range(1, P):
        p += (tile >= tl.load(tile_starts_ptr + i)).to(tl.int32)
    m = tl.load(modules_ptr + p)
    n0 = (tile - tl.load(tile_starts_ptr + p)) * BLOCK_N
    return (p, m, tl.load(ranks_ptr + m * num_adapters + j), n0, tl.load(columns_ptr + p) + n0,
            tl.load(b_chunks_ptr + p))


@triton.jit
def _load_v(v_ptr, stride_vs, stride_v, p, positions, offs_r, mask, SPLIT_K: tl.constexpr):
    """The shrink result of module slot p at `positions` x `offs_r`: the sum of its SPLIT_K partials."""
    base = v_ptr + (p * SPLIT_K) * stride_vs + positions.to(tl.int64) * stride_v + offs_r
    v = tl.load(base, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        v += tl.load(base + s * stride_vs, mask=mask, other=0.0)
    return v


@triton.jit
def _shrink_segments(x_ptr, stride_x, rows_ptr, row_table_ptr, a_offsets_ptr, ranks_ptr, modules_ptr, num_adapters,
                     token_indices_ptr, segment_starts_ptr, v_ptr, stride_vs, stride_v, in_features, kv_dim, a_chunks,
                     k_per_split, rank_tiles, num_m_splits, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, DOT_MODE: tl.constexpr):
    j = tl.program_id(0)
    pid_m = tl.program_id(1)
    p, pid_k, rank, r0, a_offset = _shrink_program(tl.program_id(2), modules_ptr, ranks_ptr, a_offsets_ptr, j,
                                                   num_adapters, rank_tiles, BLOCK_R, SPLIT_K)
    if r0 >= rank:
        return
    offs_r = r0 + tl.arange(0, BLOCK_R)
    segment_start = tl.load(segment_starts_ptr + j)
    segment_end = tl.load(segment_starts_ptr + j + 1)
    r_mask = offs_r < rank
    a_rows = a_offset + offs_r * a_chunks  # row-table index of each rank row's chunk 0
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
        out = v_ptr + (p * SPLIT_K + pid_k) * stride_vs + offs_m[:, None].to(tl.int64) * stride_v + offs_r[None, :]
        tl.store(out, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_segments(y_ptr, stride_y, v_ptr, stride_vs, stride_v, rows_ptr, row_table_ptr, b_offsets_ptr, ranks_ptr,
                     scalings_ptr, modules_ptr, num_adapters, tile_starts_ptr, columns_ptr, widths_ptr, b_chunks_ptr,
                     token_indices_ptr, segment_starts_ptr, kv_dim, num_m_splits, P: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                     DOT_MODE: tl.constexpr):
    j = tl.program_id(0)
    pid_m = tl.program_id(1)
    p, m, rank, n0, column, b_chunks = _expand_program(tl.program_id(2), modules_ptr, tile_starts_ptr, columns_ptr,
                                                       b_chunks_ptr, ranks_ptr, num_adapters, j, BLOCK_N, P)
    if rank == 0:
        return
    scaling = tl.load(scalings_ptr + m * num_adapters + j)
    segment_start = tl.load(segment_starts_ptr + j)
    segment_end = tl.load(segment_starts_ptr + j + 1)
    chunk = n0 // kv_dim
    offs_bn = tl.arange(0, BLOCK_N)
    n_mask = n0 + offs_bn < tl.load(widths_ptr + p)
    b_rows = tl.load(b_offsets_ptr + m * num_adapters + j) + chunk
    for m0 in range(segment_start + pid_m * BLOCK_M, segment_end, num_m_splits * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < segment_end
        tokens = tl.load(token_indices_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            v = _load_v(v_ptr, stride_vs, stride_v, p, offs_m[:, None], offs_r[None, :],
                        m_mask[:, None] & r_mask[None, :], SPLIT_K)
            row_ids = tl.load(row_table_ptr + b_rows + offs_r * b_chunks, mask=r_mask, other=0).to(tl.int64)
            b = tl.load(rows_ptr + row_ids[:, None] * kv_dim + (n0 - chunk * kv_dim) + offs_bn[None, :],
                        mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            acc += dot(v.to(b.dtype), b, DOT_MODE)
        y_ptrs = y_ptr + tokens[:, None] * stride_y + (column + offs_bn)[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + scaling * acc).to(y.dtype), mask=mask)


@triton.jit
def _shrink_tokens(x_ptr, stride_x, rows_ptr, row_table_ptr, a_offsets_ptr, ranks_ptr, modules_ptr, num_adapters,
                   token_indices_ptr, token_adapters_ptr, v_ptr, stride_vs, stride_v, in_features, kv_dim, a_chunks,
                   k_per_split, rank_tiles, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    position = tl.program_id(0)
    j = tl.load(token_adapters_ptr + position)
    p, pid_k, rank, r0, a_offset = _shrink_program(tl.program_id(1), modules_ptr, ranks_ptr, a_offsets_ptr, j,
                                                   num_adapters, rank_tiles, BLOCK_R, SPLIT_K)
    if r0 >= rank:
        return
    offs_r = r0 + tl.arange(0, BLOCK_R)
    token = tl.load(token_indices_ptr + position).to(tl.int64)
    r_mask = offs_r < rank
    a_rows = a_offset + offs_r * a_chunks
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
    tl.store(v_ptr + (p * SPLIT_K + pid_k) * stride_vs + position.to(tl.int64) * stride_v + offs_r, acc, mask=r_mask)


@triton.jit
def _expand_tokens(y_ptr, stride_y, v_ptr, stride_vs, stride_v, rows_ptr, row_table_ptr, b_offsets_ptr, ranks_ptr,
                   scalings_ptr, modules_ptr, num_adapters, tile_starts_ptr, columns_ptr, widths_ptr, b_chunks_ptr,
                   token_indices_ptr, token_adapters_ptr, kv_dim, P: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    position = tl.program_id(0)
    j = tl.load(token_adapters_ptr + position)
    p, m, rank, n0, column, b_chunks = _expand_program(tl.program_id(1), modules_ptr, tile_starts_ptr, columns_ptr,
                                                       b_chunks_ptr, ranks_ptr, num_adapters, j, BLOCK_N, P)
    if rank == 0:
        return
    scaling = tl.load(scalings_ptr + m * num_adapters + j)
    token = tl.load(token_indices_ptr + position).to(tl.int64)
    chunk = n0 // kv_dim
    offs_bn = tl.arange(0, BLOCK_N)
    n_mask = n0 + offs_bn < tl.load(widths_ptr + p)
    b_rows = tl.load(b_offsets_ptr + m * num_adapters + j) + chunk
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        v = _load_v(v_ptr, stride_vs, stride_v, p, position, offs_r, r_mask, SPLIT_K)
        row_ids = tl.load(row_table_ptr + b_rows + offs_r * b_chunks, mask=r_mask, other=0).to(tl.int64)
        b = tl.load(rows_ptr + row_ids[:, None] * kv_dim + (n0 - chunk * kv_dim) + offs_bn[None, :],
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.sum(v[:, None] * b.to(tl.float32), axis=0)
    y_ptrs = y_ptr + token * stride_y + column + offs_bn
    y = tl.load(y_ptrs, mask=n_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + scaling * acc).to(y.dtype), mask=n_mask)


@dataclass(frozen=True)
class LoRAKernelConfig:
    """Block sizes and splits of one launch; `None` fields are chosen from the shapes (`choose_config`)."""

    block_m: int | None = None  # tokens per block (segment form)
    block_r: int | None = None  # rank rows per tile
    block_k: int | None = None  # input features per step of shrink (divides kv_dim)
    block_n: int | None = None  # output features per tile of expand (divides kv_dim)
    split_k: int | None = None  # shrink programs along the input features (partials summed by expand)
    m_splits: int | None = None  # programs along one segment's tokens (segment form)
    num_warps: int | None = None


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def choose_config(op: str, form: str, batch: LoRABatch, features: int, max_rank: int, kv_dim: int,
                  device: torch.device, given: LoRAKernelConfig | None = None,
                  num_modules: int = 1) -> LoRAKernelConfig:
    """Fill the unset fields of `given` for one launch over `num_modules` modules of `features`
    inputs (shrink) or outputs each (expand).

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
            units = (batch.num_tokens if form == "token" else batch.num_segments * m_splits) * num_modules
            target = 4 * _multiprocessors(device)
            split_k = triton.cdiv(target, units * rank_tiles)
    split_k = _clamp(split_k, 1, min(MAX_SPLIT_K, triton.cdiv(features, block_k)))
    num_warps = given.num_warps or 4
    return LoRAKernelConfig(block_m, block_r, block_k, block_n, split_k, m_splits, num_warps)


_SM_COUNTS: dict[int, int] = {}


def _multiprocessors(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


@dataclass(frozen=True)
class ProjectionTables:
    """Where each module of a projection lives, as the kernels read it (built once per shape)."""

    modules: torch.Tensor  # [P] int32: each module's index in `MODULES` (rows of the rank tables)
    tile_starts: torch.Tensor  # [P + 1] int32: expand tiles of BLOCK_N outputs, numbered across modules
    columns: torch.Tensor  # [P] int32: each module's first column in the projection's output
    widths: torch.Tensor  # [P] int32: each module's output features
    b_chunks: torch.Tensor  # [P] int32: pool rows per canonical row of each module's B^T
    num_tiles: int


_TABLES: dict[tuple, ProjectionTables] = {}


def projection_tables(projection: Projection, kv_dim: int, block_n: int, device: torch.device) -> ProjectionTables:
    key = (projection, kv_dim, block_n, str(device))
    if key not in _TABLES:
        tiles = [triton.cdiv(width, block_n) for width in projection.widths]
        starts = [0]
        for count in tiles:
            starts.append(starts[-1] + count)
        as_int32 = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
        _TABLES[key] = ProjectionTables(
            modules=as_int32([MODULE_INDEX[m] for m in projection.modules]), tile_starts=as_int32(starts),
            columns=as_int32(list(projection.starts)), widths=as_int32(list(projection.widths)),
            b_chunks=as_int32([triton.cdiv(width, kv_dim) for width in projection.widths]), num_tiles=starts[-1])
    return _TABLES[key]


@dataclass
class Shrunk:
    """Shrink's output: `v[p * split_k + s, i, :r]`, partial sums of module slot p for LoRA token i."""

    v: torch.Tensor  # [P * split_k, num_lora_tokens, max rank] float32
    split_k: int


def projection_max_rank(batch: LoRABatch, layer: int, projection: Projection) -> int:
    """The largest rank any adapter of the batch has on any module of the projection (0: nothing to do)."""
    if batch.num_tokens == 0:
        return 0
    return max(batch.max_ranks[layer][MODULE_INDEX[m]] for m in projection.modules)


def shrink(x: torch.Tensor, rows: torch.Tensor, batch: LoRABatch, layer: int, projection: Projection,
           form: str = "segment", config: LoRAKernelConfig | None = None) -> Shrunk | None:
    """`x[token i] @ A^T` of every module of `projection`, for every LoRA token i; None if no adapter needs it."""
    max_rank = projection_max_rank(batch, layer, projection)
    if max_rank == 0:
        return None
    num_modules, in_features, kv_dim = len(projection.modules), x.shape[1], rows.shape[1]
    c = choose_config("shrink", form, batch, in_features, max_rank, kv_dim, rows.device, config, num_modules)
    k_per_split = triton.cdiv(triton.cdiv(in_features, c.split_k), c.block_k) * c.block_k
    split_k = triton.cdiv(in_features, k_per_split)
    v = torch.empty(num_modules * split_k, batch.num_tokens, max_rank, dtype=torch.float32, device=x.device)
    rank_tiles = triton.cdiv(max_rank, c.block_r)
    tables = projection_tables(projection, kv_dim, c.block_n, rows.device)
    common = (rows, batch.row_table, batch.a_offsets, batch.ranks[layer], tables.modules, batch.table_width,
              batch.token_indices)
    tail = (v, v.stride(0), v.stride(1), in_features, kv_dim, triton.cdiv(in_features, kv_dim), k_per_split,
            rank_tiles)
    programs = num_modules * rank_tiles * split_k
    if form == "segment":
        _shrink_segments[(batch.num_segments, c.m_splits, programs)](
            x, x.stride(0), *common, batch.segment_starts, *tail, c.m_splits, BLOCK_M=c.block_m, BLOCK_R=c.block_r,
            BLOCK_K=c.block_k, SPLIT_K=split_k, DOT_MODE=dot_mode(x.dtype), num_warps=c.num_warps)
    else:
        _shrink_tokens[(batch.num_tokens, programs)](
            x, x.stride(0), *common, batch.token_adapters, *tail, BLOCK_R=c.block_r, BLOCK_K=c.block_k,
            SPLIT_K=split_k, num_warps=c.num_warps)
    return Shrunk(v, split_k)


def expand(y: torch.Tensor, shrunk: Shrunk, rows: torch.Tensor, batch: LoRABatch, layer: int,
           projection: Projection, form: str = "segment", config: LoRAKernelConfig | None = None) -> None:
    """`y[token i, module columns] += s * v[i, :r] @ B^T` in place, for every module and LoRA token i."""
    max_rank = projection_max_rank(batch, layer, projection)
    kv_dim = rows.shape[1]
    c = choose_config("expand", form, batch, max(projection.widths), max_rank, kv_dim, rows.device, config)
    tables = projection_tables(projection, kv_dim, c.block_n, rows.device)
    v = shrunk.v
    common = (y, y.stride(0), v, v.stride(0), v.stride(1), rows, batch.row_table, batch.b_offsets,
              batch.ranks[layer], batch.scalings[layer], tables.modules, batch.table_width, tables.tile_starts,
              tables.columns, tables.widths, tables.b_chunks, batch.token_indices)
    if form == "segment":
        _expand_segments[(batch.num_segments, c.m_splits, tables.num_tiles)](
            *common, batch.segment_starts, kv_dim, c.m_splits, P=len(projection.modules), BLOCK_M=c.block_m,
            BLOCK_R=c.block_r, BLOCK_N=c.block_n, SPLIT_K=shrunk.split_k, DOT_MODE=dot_mode(rows.dtype),
            num_warps=c.num_warps)
    else:
        _expand_tokens[(batch.num_tokens, tables.num_tiles)](
            *common, batch.token_adapters, kv_dim, P=len(projection.modules), BLOCK_R=c.block_r, BLOCK_N=c.block_n,
            SPLIT_K=shrunk.split_k, num_warps=c.num_warps)


class TritonLoRA:
    """`LoRADelta` for one step on the Triton kernels: same semantics as `TorchLoRA`.

    `form` is "segment", "token" or "auto" (the segment form, which measured faster on an H100 even
    for decode batches of one token per adapter: see bench/results).
    """

    def __init__(self, layers: list[torch.Tensor], batch: LoRABatch, form: str = "auto",
                 config: LoRAKernelConfig | None = None):
        if form not in ("auto", "segment", "token"):
            raise ValueError(f"LoRA kernel form must be 'auto', 'segment' or 'token', got {form!r}")
        self.layers = layers
        self.batch = batch
        self.form = "segment" if form == "auto" else form
        self.config = config

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, layer: int, projection: Projection) -> None:
        if x.stride(-1) != 1 or y.stride(-1) != 1:
            raise ValueError(f"{'/'.join(projection.modules)}: LoRA kernels need rows of x and y contiguous, "
                             f"got strides {x.stride()} and {y.stride()}")
        kv_layer = self.layers[layer]
        rows = kv_layer.view(-1, kv_layer.shape[-2] * kv_layer.shape[-1])
        shrunk = shrink(x, rows, self.batch, layer, projection, self.form, self.config)
        if shrunk is not None:
            expand(y, shrunk, rows, self.batch, layer, projection, self.form, self.config)


__all__ = ["LoRAKernelConfig", "Shrunk", "TritonLoRA", "choose_config", "expand", "shrink"]
