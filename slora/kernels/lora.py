"""A step's LoRA metadata, and the batched LoRA op on the unified pool in plain torch (the oracle).

`LoRABatch` is the step's adapters and tokens as flat tables, built once per step and read by every
LoRA op (this reference, `triton_lora.py`, `lora_ablations.py`): one segment per adapter (S-LoRA's
segments; a decode token is a segment of one), the adapters' row tables concatenated, and per
(layer, module) every adapter's rank and scaling, over the architecture's module axis. It is
assembled on the host with numpy from each resident adapter's column (`ResidentAdapter.tables`),
in one buffer (`LoRATables`) that reaches the device in one copy.

`TorchLoRA`: for every token t with adapter a(t), `y[t] += s_a * (x[t] @ A_a^T) @ B_a^T`, with A and
B^T read in place from the pool's rows through the row table (no contiguous copy is kept); adapters
of different ranks share one batch and tokens without an adapter cost nothing.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from slora.architecture import Projection
from slora.kernels.metadata import LoRAOp, block_items, to_device
from slora.lora.residency import AdapterTables, ResidentAdapter


def read_rows(rows: torch.Tensor, row_ids: torch.Tensor, rank: int, chunks: int, width: int) -> torch.Tensor:
    """Rows `row_ids` of a pool layer as a `[rank, width]` matrix (chunks joined, padding cut)."""
    return rows[row_ids].view(rank, chunks * rows.shape[1])[:, :width]


def shrink(x: torch.Tensor, rows: torch.Tensor, a_row_ids: torch.Tensor, rank: int, chunks: int) -> torch.Tensor:
    """`x @ A^T`: [n, in] -> [n, rank]."""
    a = read_rows(rows, a_row_ids, rank, chunks, x.shape[1])
    return x @ a.to(x.dtype).T


def expand(y: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, b_row_ids: torch.Tensor, chunks: int,
           scaling: float) -> torch.Tensor:
    """`y + s * v @ B^T`: v [n, rank] -> [n, out]."""
    b_t = read_rows(rows, b_row_ids, v.shape[1], chunks, y.shape[1])
    return y + scaling * (v @ b_t.to(v.dtype))


# Elements: every table of a `LoRATables` buffer starts 64-byte aligned, as a tensor of its own would (Triton
# compiles a kernel apart for pointers that are not 16-byte aligned).
_ALIGN = 16


class LoRATables:
    """A step's LoRA tables (`LoRABatch`'s) on the host, as numpy views (`arrays`) of one int32 buffer;
    the float32 scalings are a view of its bytes. One copy of the buffer moves every table, and the
    same views of the copy are the device tables (`views`).

    The row table comes last, so that a copy of the buffer's first `end(num_rows)` elements moves
    every table and the used part of a row table sized for the whole pool (the CUDA graphs' static
    tables, `engine/cuda_graphs.py`, whose host side is one of these, pinned).
    """

    def __init__(self, num_rows: int, num_layers: int, modules: int, width: int, num_tokens: int,
                 pin_memory: bool = False):
        shapes = {"segment_starts": (width + 1,), "token_indices": (num_tokens,), "token_adapters": (num_tokens,),
                  "a_offsets": (modules, width), "b_offsets": (modules, width), "ranks": (num_layers, modules, width),
                  "scalings": (num_layers, modules, width), "row_table": (num_rows,)}
        self.layout: dict[str, tuple[int, tuple[int, ...]]] = {}  # table -> (first element in the buffer, shape)
        size = 0
        for name, shape in shapes.items():
            self.layout[name] = (size, shape)
            size += -(-math.prod(shape) // _ALIGN) * _ALIGN
        self.buffer = torch.empty(size, dtype=torch.int32, pin_memory=pin_memory)
        host = self.buffer.numpy()
        host.fill(0)  # numpy's fill: torch.zeros' threaded one took ~8 ms on a busy 2-core host
        self.arrays: dict[str, np.ndarray] = self.views(host)

    def views(self, buffer: np.ndarray | torch.Tensor) -> dict[str, np.ndarray | torch.Tensor]:
        """The tables as views of `buffer`: this buffer as numpy, or a torch copy of it on any device."""
        float32 = np.float32 if isinstance(buffer, np.ndarray) else torch.float32
        views = {}
        for name, (start, shape) in self.layout.items():
            view = buffer[start : start + math.prod(shape)].reshape(shape)
            views[name] = view.view(float32) if name == "scalings" else view
        return views

    def end(self, num_rows: int) -> int:
        """Elements of the buffer up to the first `num_rows` entries of the row table."""
        return self.layout["row_table"][0] + num_rows


@dataclass
class LoRABatch:
    """One step's adapters and tokens as the tensors the Triton LoRA kernels read.

    Adapter j (`adapters[j]`) is segment j: the flat-batch tokens `token_indices[segment_starts[j] :
    segment_starts[j + 1]]`. Its canonical row `c` of module m is pool row
    `row_table[a_offsets[m, j] + c]` (A) or `row_table[b_offsets[m, j] + c]` (B^T); its rank and
    scaling at (layer, m) are `ranks[layer, m, j]` and `scalings[layer, m, j]` (rank 0: not targeted).
    """

    adapters: list[ResidentAdapter]
    row_table: torch.Tensor  # [sum of num_rows] int32: the adapters' row tables, concatenated
    a_offsets: torch.Tensor  # [num_modules, num_adapters] int32
    b_offsets: torch.Tensor  # [num_modules, num_adapters] int32
    ranks: torch.Tensor  # [num_layers, num_modules, num_adapters] int32
    scalings: torch.Tensor  # [num_layers, num_modules, num_adapters] float32
    token_indices: torch.Tensor  # [num_lora_tokens] int32, grouped by adapter
    token_adapters: torch.Tensor  # [num_lora_tokens] int32: the adapter of each of those tokens
    segment_starts: torch.Tensor  # [num_adapters + 1] int32
    max_ranks: list[list[int]]  # [num_layers][num_modules], on the host: launch sizes, 0 = skip
    max_segment_len: int
    host: LoRATables | None = None  # the tables on the host (`from_lists`), which the CUDA graphs copy from
    # The segment kernels' programs along the tokens: fixed ones (a CUDA graph's static batch, filled per
    # step), else made by `work_items` per block size, once per step.
    items: torch.Tensor | None = None
    _items: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.token_indices.numel()

    @property
    def num_segments(self) -> int:
        """Programs along the adapter axis: one per segment (some may be empty in a captured step)."""
        return self.segment_starts.numel() - 1

    @property
    def table_width(self) -> int:
        """Columns of the offset, rank and scaling tables (>= num_segments in a captured step)."""
        return self.ranks.shape[-1]

    def work_items(self, block_m: int, max_m_splits: int) -> torch.Tensor:
        """[n, 2] int32 (segment j, i): the segment kernels' programs along the tokens. Segment j gets
        min(its blocks of `block_m` tokens, `max_m_splits`) programs, and program i takes its blocks i,
        i + that count, ...: long segments are spread out and no program is left without a block
        (a grid of every segment times the longest one's blocks left most of a mixed step's idle)."""
        if self.items is not None:
            return self.items
        key = (block_m, max_m_splits)
        if key not in self._items:
            self._items[key] = to_device(self.host_work_items(block_m, max_m_splits), self.segment_starts.device)
        return self._items[key]

    def host_work_items(self, block_m: int, max_m_splits: int) -> np.ndarray:
        """`work_items` on the host, made from the step's host tables."""
        if self.host is not None:
            starts = self.host.arrays["segment_starts"][: self.num_segments + 1]
        else:
            starts = self.segment_starts.cpu().numpy()
        return block_items(np.minimum(-(-np.diff(starts).astype(np.int64) // block_m), max_m_splits))

    @classmethod
    def from_lists(cls, adapters: list[ResidentAdapter], token_lists: list[list[int]], num_layers: int,
                   num_modules: int, device: torch.device | str) -> "LoRABatch":
        """Adapter j's tokens are `token_lists[j]` (positions in the flat batch)."""
        columns = [adapter.tables for adapter in adapters]
        lengths = np.fromiter(map(len, token_lists), dtype=np.int32, count=len(token_lists))
        num_rows = np.fromiter((c.row_table.size for c in columns), dtype=np.int32, count=len(columns))
        # Pinned for a CUDA device: the copy is then asynchronous (torch's pinned-memory cache keeps the buffer
        # from reuse until the copy is done).
        tables = LoRATables(int(num_rows.sum()), num_layers, num_modules, len(adapters), int(lengths.sum()),
                            pin_memory=torch.device(device).type == "cuda")
        t = tables.arrays
        if columns:
            np.concatenate([c.row_table for c in columns], out=t["row_table"])
            side = AdapterTables.side_by_side(columns, num_layers, num_modules)
            row_starts = np.cumsum(num_rows) - num_rows  # where each adapter's rows begin in the row table
            for name in ("a_offsets", "b_offsets"):  # 0 for modules an adapter does not target
                t[name][:] = (side[name] + row_starts) * side["targeted"]
            t["ranks"][:] = side["ranks"]
            t["scalings"][:] = side["scalings"]
        np.cumsum(lengths, out=t["segment_starts"][1:])
        t["token_indices"][:] = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int32,
                                            count=t["token_indices"].size)
        t["token_adapters"][:] = np.repeat(np.arange(len(adapters), dtype=np.int32), lengths)
        return cls(adapters=adapters, **tables.views(tables.buffer.to(device, non_blocking=True)),
                   max_ranks=t["ranks"].max(axis=2, initial=0).tolist(), max_segment_len=int(lengths.max(initial=0)),
                   host=tables)


def pool_rows(kv_layer: torch.Tensor) -> torch.Tensor:
    """A pool layer `[slots, 2, kv_heads, head_dim]` seen as rows of `kv_dim` elements."""
    return kv_layer.view(-1, kv_layer.shape[-2] * kv_layer.shape[-1])


@dataclass
class _Shrunk:
    """One adapter's shrink of one module: what `TorchLoRA.finish` expands."""

    tokens: torch.Tensor  # its tokens' positions in the flat batch
    start: int  # the module's first column in y
    width: int
    v: torch.Tensor  # [tokens, rank]
    b_row_ids: torch.Tensor
    b_chunks: int
    scaling: float


class TorchLoRA:
    """`LoRAOp` for one step in plain torch: each adapter's tokens, module by module."""

    def __init__(self, layers: list[torch.Tensor], batch: LoRABatch):
        self.layers = layers
        self.batch = batch
        t = batch.host.arrays
        self._ranks, self._scalings = t["ranks"], t["scalings"]
        self._a_offsets, self._b_offsets = t["a_offsets"], t["b_offsets"]
        starts = t["segment_starts"][: batch.num_segments + 1].tolist()
        self._tokens = [batch.token_indices[a:b].long() for a, b in itertools.pairwise(starts)]

    def start(self, x: torch.Tensor, layer: int, projection: Projection) -> tuple[torch.Tensor, list[_Shrunk]] | None:
        rows = pool_rows(self.layers[layer])
        kv_dim, a_chunks = rows.shape[1], -(-x.shape[1] // rows.shape[1])
        started = []
        for m, start, width in zip(projection.targets, projection.starts, projection.widths):
            b_chunks = -(-width // kv_dim)
            for j, tokens in enumerate(self._tokens):
                rank = int(self._ranks[layer, m, j])
                if rank == 0:
                    continue
                a, b = int(self._a_offsets[m, j]), int(self._b_offsets[m, j])
                v = shrink(x[tokens], rows, self.batch.row_table[a : a + rank * a_chunks].long(), rank, a_chunks)
                started.append(_Shrunk(tokens, start, width, v, self.batch.row_table[b : b + rank * b_chunks].long(),
                                       b_chunks, float(self._scalings[layer, m, j])))
        return (rows, started) if started else None

    def finish(self, started: tuple[torch.Tensor, list[_Shrunk]], y: torch.Tensor) -> None:
        rows, shrunk = started
        for s in shrunk:
            columns = y[:, s.start : s.start + s.width]
            columns[s.tokens] = expand(columns[s.tokens], s.v, rows, s.b_row_ids, s.b_chunks, s.scaling)


def apply_lora(op: LoRAOp, y: torch.Tensor, x: torch.Tensor, layer: int, projection: Projection) -> None:
    """Both halves of a LoRA op into `y` in place, with nothing between them (a model runs its GEMM there)."""
    started = op.start(x, layer, projection)
    if started is not None:
        op.finish(started, y)
