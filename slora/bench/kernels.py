"""`slora bench kernels`: the Triton kernels against the torch reference and S-LoRA's ablations.

For one model shape (Llama-2-7B by default) and dtype, on synthetic weights in shuffled pool rows:

- LoRA decode (256 tokens of 64 distinct adapters, and of 256; ranks 8..64; q/k/v/o of one layer,
  q/k/v as the one fused projection the model runs) and LoRA prefill (long segments): the Triton
  segment (MBGMM) and token (MBGMV) forms, the torch reference,
  and the ablations (`kernels/lora_ablations.py`, the engine's `lora_kernel="bmm"`/`"padded"`):
  `gather_bmm` (at each op, gather every token's adapter rows from the pool into a batch padded to
  the largest rank, then `torch.bmm`), `padded_bmm` (at each op, gather each adapter's rows once,
  padded to the largest rank, then every token `torch.bmm`s with its adapter's) and `triton_padded`
  (the segment kernel over copies of the adapters padded to the largest rank);
- paged attention: decode at 1k and 4k contexts, and a prefill;
- the fused small ops (residual + RMSNorm, rotary + K/V write) against the torch ops the reference
  model runs, at the decode batch's token count;
- for each LoRA case, q/k/v's base GEMM alone, followed by its LoRA (as steps run them), and with the
  LoRA shrink on a side stream beside the GEMM: what overlapping the two would save.

Each kernel's time is reported with the bandwidth it achieves over the bytes it must read and write
(the batch's distinct adapters' A and B once, x, y read and written; K/V of every context once),
next to the device's copy bandwidth (a large device-to-device copy, bytes read + written), and its
FLOP/s next to a large matmul's. Writes `kernels.json` (with `device`, `commit`, `date`) and
`kernels.md` to `--output`. `--tiny` runs tiny shapes, on the CPU under Triton's interpreter too,
so that the benchmark keeps working without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from slora.architecture import ArchitectureSpec, Projection
from slora.bench.roofline import measure_copy_bandwidth
from slora.config import ModelConfig
from slora.kernels.lora import LoRABatch, TorchLoRA, apply_lora
from slora.kernels.lora_ablations import PaddedBmmLoRA
from slora.kernels.metadata import AttentionMetadata, SlotTable
from slora.lora.layout import ModuleRows, RowLayout
from slora.lora.residency import AdapterTables, ResidentAdapter
from slora.models.loader import architecture_spec

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def model_shape(name: str) -> ModelConfig:
    shapes = {  # name: (hidden, intermediate, heads, kv_heads, head_dim)
        "llama-2-7b": (4096, 11008, 32, 32, 128),
        "llama-2-13b": (5120, 13824, 40, 40, 128),
        "llama-3-8b": (4096, 14336, 32, 8, 128),
        "tiny": (64, 160, 4, 2, 16),
    }
    if name not in shapes:
        raise ValueError(f"unknown model shape {name!r}; choose one of {', '.join(shapes)}")
    hidden, intermediate, heads, kv_heads, head_dim = shapes[name]
    return ModelConfig("llama", 32000, hidden, intermediate, 1, heads, kv_heads, head_dim, 8192)


def module_shapes(arch: ArchitectureSpec) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LoRA target."""
    return {module: arch.shape(module) for module in arch.module_names}


@dataclass
class Settings:
    model_shape: str = "llama-2-7b"
    dtype: str = "float16"
    decode_tokens: int = 256
    decode_adapters: int = 64
    decode_adapters_all_distinct: bool = True  # also the decode case of one token per adapter
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    prefill_segments: tuple[int, ...] = (512, 512, 256, 256, 128, 128, 64, 64)  # tokens per adapter
    contexts: tuple[int, ...] = (1024, 4096)
    decode_seqs: int = 32
    prefill_seqs: tuple[int, ...] = (1024, 1024, 512, 512)  # attention prefill query lengths
    # A mixed step as serving makes them: decoding sequences (each its own adapter, contexts of
    # `mixed_context`) and prompt chunks (each its own adapter, after a prefix of `mixed_context`).
    mixed_decode: int = 254
    mixed_prefill: tuple[int, ...] = (400,)
    mixed_context: int = 512
    copy_bytes: int = 2**31
    matmul_size: int = 8192
    sweep: bool = False  # also time a grid of LoRA block sizes and splits (segment form) and report the best

    @classmethod
    def tiny(cls) -> "Settings":
        return cls(model_shape="tiny", dtype="float32", decode_tokens=8, decode_adapters=3, ranks=(2, 4, 8),
                   prefill_segments=(20, 3), contexts=(40,), decode_seqs=2, prefill_seqs=(6, 3), mixed_decode=3,
                   mixed_prefill=(18,), mixed_context=24, copy_bytes=2**20, matmul_size=64)


@dataclass
class Result:
    case: str
    method: str
    time_us: float
    bytes: int  # what the op must read and write, whatever the method reads in fact
    flops: int
    gbps: float = 0.0
    pct_copy_bandwidth: float = 0.0
    pct_same_size_copy: float = 0.0  # of what a copy moving `bytes` reaches (`SameSizeCopy`)
    tflops: float = 0.0
    pct_matmul_peak: float = 0.0
    speedup_vs_reference: float | None = None
    max_error: float | None = None  # vs the reference's output, relative to the delta's magnitude
    config: str | None = None  # the Triton launch configuration, where one was chosen or swept
    sweep: list[tuple[str, float]] | None = None  # a tuned row: every configuration swept, with its time in us


@dataclass
class Report:
    device: str
    commit: str
    date: str
    torch: str
    triton: str
    settings: dict
    copy_bandwidth_gbps: float
    matmul_peak_tflops: float
    results: list[Result] = field(default_factory=list)


# --- timing and device peaks --------------------------------------------------------------------------
def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Microseconds per call of `fn`: on CUDA the median of graph replays (`cuda_graph_time`); on the
    CPU one call after a warm-up (the interpreter is for keeping the benchmark working, not timing)."""
    if device.type == "cuda":
        return cuda_graph_time

    def cpu_time(fn: Callable[[], object]) -> float:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6

    return cpu_time


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def cuda_graph_time(fn: Callable[[], object], repeats: int = 50) -> float:
    """Median GPU time of `fn` captured in a CUDA graph, L2 flushed before each replay.

    A graph keeps Python's launch overhead out (as the engine's decode graphs will), so a few-µs
    kernel is timed, not its launcher; the flush (a 256 MB write, outside the timed events) makes
    every replay read its weights from HBM. Falls back to `triton.testing.do_bench` when `fn` cannot
    be captured.
    """
    from triton.testing import do_bench

    flush = _L2_FLUSH.setdefault(torch.device("cuda", torch.cuda.current_device()),
                                 torch.empty(256 * 2**20, dtype=torch.int8, device="cuda"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up: compile, autotune, allocate outside the capture
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001 - anything a capture refuses: time it launch by launch
        torch.cuda.synchronize()
        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in zip(starts, ends))
    return times[len(times) // 2] * 1e3


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, measure) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return 2 * size**3 / measure(lambda: a @ b) / 1e6  # TFLOP/s


# --- synthetic adapters in the pool ---------------------------------------------------------------------
def _resident(name: str, layout: RowLayout, rank: int, scaling: float, row_table: torch.Tensor,
              arch: ArchitectureSpec) -> ResidentAdapter:
    """A resident adapter of one layer whose modules all take `rank`, in pool rows `row_table`."""
    ranks = {(0, module): rank for module in layout.modules}
    tables = AdapterTables.of(layout, ranks, dict.fromkeys(ranks, scaling), row_table.cpu().numpy(), arch.index, 1)
    return ResidentAdapter(name, layout, [], tables)


def synthetic_adapters(ranks: list[int], arch: ArchitectureSpec, modules: tuple[str, ...], rows: torch.Tensor,
                       free_rows: torch.Tensor, generator: torch.Generator) -> list[ResidentAdapter]:
    """Adapters of `ranks` over `modules`, weights written into `rows` (a pool layer) at `free_rows`, in order.

    The weights are small (about 1/sqrt(dim)) so that repeated timing runs keep y finite.
    """
    config, shapes = arch.config, module_shapes(arch)
    kv_dim = config.kv_dim
    adapters, used = [], 0
    for i, rank in enumerate(ranks):
        layout_modules, row = {}, 0
        for module in modules:
            in_features, out_features = shapes[module]
            a_chunks, b_chunks = math.ceil(in_features / kv_dim), math.ceil(out_features / kv_dim)
            layout_modules[module] = ModuleRows(row, a_chunks, row + rank * a_chunks, b_chunks, in_features,
                                                out_features)
            row += rank * (a_chunks + b_chunks)
        row_table = free_rows[used : used + row]
        if row_table.numel() < row:
            raise ValueError(f"the benchmark pool holds {free_rows.numel()} rows, the adapters need more")
        used += row
        values = torch.randn(row, kv_dim, generator=generator) / math.sqrt(config.hidden_size)
        rows[row_table] = values.to(rows.device, rows.dtype)
        adapters.append(_resident(f"bench{i}", RowLayout(layout_modules, row), rank, 16.0 / rank, row_table, arch))
    return adapters


def padded_copies(adapters: list[ResidentAdapter], ranks: list[int], max_rank: int, rows: torch.Tensor,
                  free_rows: torch.Tensor, arch: ArchitectureSpec) -> list[ResidentAdapter]:
    """The same adapters (of `ranks`) padded to `max_rank` (zero rows past their rank): the padding ablation."""
    copies, used = [], 0
    for adapter, rank in zip(adapters, ranks):
        source_rows = torch.from_numpy(adapter.tables.row_table).long().to(rows.device)
        layout_modules, row = {}, 0
        for module, m in adapter.layout.modules.items():
            layout_modules[module] = ModuleRows(row, m.a_chunks, row + max_rank * m.a_chunks, m.b_chunks,
                                                m.in_features, m.out_features)
            row += max_rank * (m.a_chunks + m.b_chunks)
        row_table = free_rows[used : used + row]
        used += row
        rows[row_table] = 0
        for module, m in adapter.layout.modules.items():
            padded = layout_modules[module]
            for start, padded_start, chunks in ((m.a_start, padded.a_start, m.a_chunks),
                                                (m.b_start, padded.b_start, m.b_chunks)):
                source = source_rows[start : start + rank * chunks]
                rows[row_table[padded_start : padded_start + rank * chunks]] = rows[source]
        copies.append(_resident(adapter.name + "-padded", RowLayout(layout_modules, row), max_rank, 16.0 / rank,
                                row_table, arch))
    return copies


def projections_of(arch: ArchitectureSpec, modules: tuple[str, ...]) -> list[Projection]:
    """The model's projections (fused as the model runs them) that consist of `modules`."""
    return [p for p in arch.projections.values() if set(p.modules) <= set(modules)]


def adapter_rows_needed(ranks: list[int], arch: ArchitectureSpec, modules: tuple[str, ...]) -> int:
    shapes, kv_dim = module_shapes(arch), arch.config.kv_dim
    return sum(r * (math.ceil(shapes[m][0] / kv_dim) + math.ceil(shapes[m][1] / kv_dim)) for r in ranks for m in modules)


def batch_of(token_adapters: list[int | None], adapters: list[ResidentAdapter], arch: ArchitectureSpec,
             device: torch.device) -> LoRABatch:
    """The step tables of tokens whose adapters are `token_adapters` (None: no adapter; segments in adapter
    order)."""
    by_adapter: dict[int, list[int]] = {}
    for t, a in enumerate(token_adapters):
        if a is not None:
            by_adapter.setdefault(a, []).append(t)
    order = sorted(by_adapter)
    return LoRABatch.from_lists([adapters[a] for a in order], [by_adapter[a] for a in order], 1, len(arch.targets),
                                device)


def copies_time(sizes: list[int], device: torch.device, dtype: torch.dtype, measure) -> float:
    """Microseconds of one elementwise copy kernel per entry of `sizes` (bytes each moves, read + write),
    run one after another and timed as one call (on CUDA: one graph, like the kernels)."""
    pairs = []
    for nbytes in sizes:
        source = torch.ones(max(1, nbytes // 2 // dtype.itemsize), dtype=dtype, device=device)
        pairs.append((source, torch.empty_like(source)))

    def copy_all() -> None:
        for source, target in pairs:
            torch.mul(source, 1, out=target)

    return measure(copy_all)


class SameSizeCopy:
    """GB/s of an elementwise copy kernel that moves a given number of bytes (read + write), timed like the
    kernels. A launch that moves tens of MB cannot reach a large copy's rate (on an H200, 43% of it at
    16 MB, 72% at 64 MB: bench/results/2026-12-01-h200-c6407e2), so an op's share of this says how much
    of its shortfall its size alone explains."""

    def __init__(self, device: torch.device, dtype: torch.dtype, measure):
        self.device, self.dtype, self.measure = device, dtype, measure
        self._gbps: dict[int, float] = {}

    def gbps(self, nbytes: int) -> float:
        if nbytes not in self._gbps:
            moved = 2 * max(1, nbytes // 2 // self.dtype.itemsize) * self.dtype.itemsize
            self._gbps[nbytes] = moved / (copies_time([nbytes], self.device, self.dtype, self.measure) / 1e6) / 1e9
        return self._gbps[nbytes]


# --- cases ----------------------------------------------------------------------------------------------
def _finish(result: Result, copy_gbps: float, peak_tflops: float, same_size_copy: SameSizeCopy) -> Result:
    seconds = result.time_us / 1e6
    result.gbps = result.bytes / seconds / 1e9
    result.pct_copy_bandwidth = 100 * result.gbps / copy_gbps
    result.pct_same_size_copy = 100 * result.gbps / same_size_copy.gbps(result.bytes)
    result.tflops = result.flops / seconds / 1e12
    result.pct_matmul_peak = 100 * result.tflops / peak_tflops
    return result


def lora_case(case: str, token_adapters: list[int], ranks: list[int], config: ModelConfig, dtype: torch.dtype,
              device: torch.device, measure, generator: torch.Generator, sweep: bool = False) -> list[Result]:
    """All methods applying the q/k/v/o deltas of one layer to one batch."""
    from slora.kernels.triton_lora import TritonLoRA

    modules, arch = LORA_MODULES, architecture_spec(config)
    num_tokens, kv_dim = len(token_adapters), config.kv_dim
    padded_ranks = [max(ranks)] * len(ranks)
    rows_needed = adapter_rows_needed(ranks, arch, modules) + adapter_rows_needed(padded_ranks, arch, modules)
    num_slots = rows_needed // 2 + 2
    pool = torch.zeros(num_slots, 2, config.num_kv_heads, config.head_dim, dtype=dtype, device=device)
    rows = pool.view(-1, kv_dim)
    free_rows = (torch.randperm(2 * num_slots - 1, generator=generator) + 1).to(device)  # row 0 stays zero
    adapters = synthetic_adapters(ranks, arch, modules, rows, free_rows, generator)
    used = sum(a.layout.num_rows for a in adapters)
    padded = padded_copies(adapters, ranks, max(ranks), rows, free_rows[used:], arch)
    shapes = module_shapes(arch)
    projections = projections_of(arch, modules)
    xs = {p: torch.randn(num_tokens, shapes[p.modules[0]][0], generator=generator).to(device, dtype)
          for p in projections}
    y0 = {p: torch.randn(num_tokens, sum(p.widths), generator=generator).to(device, dtype) for p in projections}
    lora_batch = batch_of(token_adapters, adapters, arch, device)
    methods = {
        "torch_reference": TorchLoRA([pool], lora_batch),
        "triton_segment": TritonLoRA([pool], lora_batch, form="segment"),
        "triton_token": TritonLoRA([pool], lora_batch, form="token"),
        "triton_padded": TritonLoRA([pool], batch_of(token_adapters, padded, arch, device), form="segment"),
        "gather_bmm": PaddedBmmLoRA([pool], lora_batch, gather="token"),
        "padded_bmm": PaddedBmmLoRA([pool], lora_batch, gather="adapter"),
    }
    distinct = {j: adapters[j] for j in set(token_adapters)}
    weight_elements = sum(ranks[j] * sum(shapes[m][0] + shapes[m][1] for m in modules) for j in distinct)
    io_elements = num_tokens * sum(shapes[p.modules[0]][0] + 2 * sum(p.widths) for p in projections)
    num_bytes = (weight_elements + io_elements) * pool.element_size()
    flops = 2 * sum(ranks[a] for a in token_adapters) * sum(shapes[m][0] + shapes[m][1] for m in modules)
    expected = {}
    for p in projections:
        expected[p] = y0[p].clone()
        apply_lora(methods["torch_reference"], expected[p], xs[p], 0, p)
    results = []
    for method, op in methods.items():
        ys = {p: y0[p].clone() for p in projections}
        error = 0.0
        for p in projections:
            apply_lora(op, ys[p], xs[p], 0, p)
            delta = (expected[p].float() - y0[p].float()).abs().max().item()
            error = max(error, (ys[p].float() - expected[p].float()).abs().max().item() / max(delta, 1e-30))

        def run(op=op, ys=ys) -> None:
            for p in projections:
                apply_lora(op, ys[p], xs[p], 0, p)

        results.append(Result(case, method, measure(run), num_bytes, flops, max_error=error))
    results.append(_copy_per_launch_bound(case, projections, shapes, sum(ranks[j] for j in distinct), num_tokens,
                                          pool, measure))
    results += _lora_single_ops(case, methods, xs, y0, projections[0], ranks, distinct, shapes, measure, sweep)
    results += _beside_base_gemm(case, methods["triton_segment"], xs[projections[0]], projections[0], ranks, distinct,
                                 measure, generator)
    return results


def _launch_bytes(projection: Projection, shapes: dict, rank_sum: int, num_tokens: int,
                  element: int) -> tuple[int, int]:
    """(shrink, expand) bytes one projection's LoRA launches must move: its modules' A and x; B, and y read
    and written (over adapters whose ranks sum to `rank_sum`; v, the float32 partials, not counted)."""
    in_features, out_features = shapes[projection.modules[0]][0], sum(projection.widths)
    return ((rank_sum * in_features * len(projection.modules) + num_tokens * in_features) * element,
            (rank_sum * out_features + 2 * num_tokens * out_features) * element)


def _copy_per_launch_bound(case: str, projections: list[Projection], shapes: dict, rank_sum: int, num_tokens: int,
                           pool: torch.Tensor, measure) -> Result:
    """One copy kernel per launch of the op (`_launch_bytes`), moving that launch's bytes, all in one graph:
    what the op would take if every launch were as fast as a copy of its size. Its % of copy bandwidth
    bounds any op of these launches."""
    sizes, names = [], []
    for p in projections:
        sizes += _launch_bytes(p, shapes, rank_sum, num_tokens, pool.element_size())
        name = "+".join(m.removesuffix("_proj") for m in p.modules)
        names += [f"{name} shrink", f"{name} expand"]
    layout = ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in zip(names, sizes))
    return Result(case, f"copy_per_launch_bound[{len(sizes)} launches]",
                  copies_time(sizes, pool.device, pool.dtype, measure), sum(sizes), 0, config=layout)


def _sweep_configs(op: str) -> list:
    """The segment form's grid (the form the engine runs): 54 launches each for shrink and expand, of 18
    compiled variants each (each compile takes a second or two; splits are arguments)."""
    from slora.kernels.triton_lora import LoRAKernelConfig

    if op == "shrink":
        return [LoRAKernelConfig(block_r=r, block_k=k, split_k=s, num_stages=t) for r in (16, 32, 64)
                for k in (64, 128, 256) for s in (None, 2, 8) for t in (3, 4)]
    return [LoRAKernelConfig(block_r=r, block_n=n, n_splits=s, num_stages=t) for r in (32, 64)
            for n in (64, 128, 256) for s in (None, 2, 8) for t in (2, 3, 4)]


def _time_if_it_fits(measure, fn: Callable[[], object]) -> float | None:
    """`measure(fn)`, or None for a sweep's configuration that needs more shared memory than the device has."""
    from triton.runtime.errors import OutOfResources

    try:
        return measure(fn)
    except OutOfResources:
        return None


def _config_text(config) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(config).items() if v is not None)


def _lora_single_ops(case, methods, xs, y0, projection: Projection, ranks, distinct, shapes, measure,
                     sweep: bool) -> list[Result]:
    """Shrink and expand alone, for the first projection (q/k/v fused) in both Triton forms: where the
    time goes. With `sweep`, also the best of a grid of block sizes and splits for each."""
    from slora.kernels.triton_lora import choose_config, expand, projection_max_rank, shrink

    results = []
    in_features, out_features = shapes[projection.modules[0]][0], sum(projection.widths)
    name = "+".join(m.removesuffix("_proj") for m in projection.modules)
    for form in ("segment", "token"):
        op = methods[f"triton_{form}"]
        batch, rows = op.batch, op.layers[0].view(-1, op.layers[0].shape[-2] * op.layers[0].shape[-1])
        n, max_rank = batch.num_tokens, projection_max_rank(batch, 0, projection)
        token_ranks = sum(ranks[j] * (batch.segment_starts[i + 1] - batch.segment_starts[i]).item()
                          for i, j in enumerate(_adapter_ids(batch, distinct)))
        num_modules = len(projection.modules)
        shrink_bytes, expand_bytes = _launch_bytes(projection, shapes, sum(ranks[j] for j in distinct), n,
                                                   rows.element_size())
        y, x = y0[projection].clone(), xs[projection]
        shrunk = shrink(x, rows, batch, 0, projection, form)
        v_bytes = shrunk.v.numel() * 4  # a single launch writes (shrink) or reads (expand) v too
        ops = {
            "shrink": (lambda c: shrink(x, rows, batch, 0, projection, form, c), shrink_bytes + v_bytes,
                       2 * token_ranks * in_features * num_modules, in_features, num_modules),
            "expand": (lambda c: expand(y, shrunk, rows, batch, 0, projection, form, c), expand_bytes + v_bytes,
                       2 * token_ranks * out_features, max(projection.widths), num_modules),
        }
        for op_name, (launch, num_bytes, flops, features, modules) in ops.items():
            chosen = choose_config(op_name, form, batch, features, max_rank, rows.shape[1], rows.device,
                                   num_modules=modules)
            method = f"triton_{form}_{op_name}[{name}]"
            results.append(Result(case, method, measure(lambda: launch(None)), num_bytes, flops,
                                  config=_config_text(chosen)))
            if sweep and form == "segment":
                fill = lambda c: choose_config(op_name, form, batch, features, max_rank,  # noqa: E731
                                               rows.shape[1], rows.device, c, modules)
                timed = [(t, fill(c)) for c in _sweep_configs(op_name)
                         if (t := _time_if_it_fits(measure, lambda c=c: launch(c))) is not None]
                best_time, best = min(timed, key=lambda pair: pair[0])
                results.append(Result(case, f"{method} tuned ({len(timed)} configs)", best_time, num_bytes, flops,
                                      config=_config_text(best),
                                      sweep=[(_config_text(c), round(t, 2)) for t, c in timed]))
    return results


def _beside_base_gemm(case, op, x: torch.Tensor, projection: Projection, ranks, distinct, measure,
                      generator: torch.Generator) -> list[Result]:
    """The projection's base GEMM and its LoRA (segment form), as a step runs them now (one after the
    other) and with shrink on a side stream beside the GEMM (both read only x; expand waits for both),
    each captured as one graph: what overlapping LoRA with the base model's GEMM would save. On the
    CPU there is no side stream, and the two run the same."""
    from slora.kernels.triton_lora import expand, shrink

    batch, rows = op.batch, op.layers[0].view(-1, op.layers[0].shape[-2] * op.layers[0].shape[-1])
    out_features = sum(projection.widths)
    weight = (torch.randn(out_features, x.shape[1], generator=generator) / x.shape[1] ** 0.5).to(x.device, x.dtype)
    y = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    side = torch.cuda.Stream(x.device) if x.device.type == "cuda" else None

    def gemm() -> None:
        torch.matmul(x, weight.t(), out=y)

    def then_lora() -> None:
        gemm()
        expand(y, shrink(x, rows, batch, 0, projection), rows, batch, 0, projection)

    def beside() -> None:
        if side is None:
            return then_lora()
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            shrunk = shrink(x, rows, batch, 0, projection)
        gemm()
        torch.cuda.current_stream(x.device).wait_stream(side)
        expand(y, shrunk, rows, batch, 0, projection)

    gemm()
    base = y.float().clone()  # (.float() of a float32 tensor is the tensor itself)
    then_lora()
    expected = y.float().clone()
    beside()
    if side is not None:
        torch.cuda.current_stream(x.device).synchronize()
    # Relative to the LoRA delta (as every other row's error): a shrink that raced the GEMM shows here.
    error = ((y.float() - expected).abs().max() / (expected - base).abs().max()).item()
    element, num_modules = x.element_size(), len(projection.modules)
    gemm_bytes = (weight.numel() + x.numel() + y.numel()) * element
    lora_bytes = (sum(ranks[j] for j in distinct) * (x.shape[1] * num_modules + out_features) + 2 * y.numel()) * element
    gemm_flops = 2 * x.shape[0] * x.shape[1] * out_features
    name = "+".join(m.removesuffix("_proj") for m in projection.modules)
    return [Result(case, f"base_gemm[{name}]", measure(gemm), gemm_bytes, gemm_flops),
            Result(case, f"base_gemm_then_lora[{name}]", measure(then_lora), gemm_bytes + lora_bytes, gemm_flops),
            Result(case, f"base_gemm_beside_shrink[{name}]", measure(beside), gemm_bytes + lora_bytes, gemm_flops,
                   max_error=error)]


def _adapter_ids(batch: LoRABatch, distinct: dict[int, ResidentAdapter]) -> list[int]:
    by_identity = {id(adapter): j for j, adapter in distinct.items()}
    return [by_identity[id(adapter)] for adapter in batch.adapters]


def random_attention_batch(query_lens: list[int], context_lens: list[int], num_heads: int, kv_heads: int,
                           head_dim: int, dtype: torch.dtype, device: torch.device | str,
                           generator: torch.Generator, spare_slots: int = 0):
    """A random pool and sequences whose slots are scattered over it (the last `query_len` of each
    context are new tokens); returns (pool, metadata with a slot table, q, k, v of the new tokens)."""
    num_slots = sum(context_lens) + spare_slots
    pool = torch.randn(num_slots, 2, kv_heads, head_dim, generator=generator).to(device, dtype)
    order = torch.randperm(num_slots, generator=generator)
    slots, starts, mapping, used = [], [], [], 0
    for query_len, context_len in zip(query_lens, context_lens):
        slots.append(order[used : used + context_len].tolist())
        used += context_len
        starts.append(len(mapping))
        mapping += slots[-1][context_len - query_len :]  # the prefix is already in the pool
    meta = AttentionMetadata(torch.tensor(mapping, device=device), SlotTable.build(starts, list(query_lens), slots, device),
                             head_dim**-0.5)
    q = torch.randn(len(mapping), num_heads, head_dim, generator=generator).to(device, dtype)
    k, v = (torch.randn(len(mapping), kv_heads, head_dim, generator=generator).to(device, dtype) for _ in range(2))
    return pool, meta, q, k, v


def attention_case(case: str, query_lens: list[int], context_lens: list[int], config: ModelConfig,
                   dtype: torch.dtype, device: torch.device, measure, generator: torch.Generator) -> list[Result]:
    from slora.kernels import attention, triton_attention

    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    pool, meta, q, k, v = random_attention_batch(query_lens, context_lens, heads, kv_heads, head_dim, dtype, device,
                                                 generator)
    tokens = q.shape[0]
    element = pool.element_size()
    num_bytes = (sum(context_lens) * 2 * kv_heads * head_dim + 2 * tokens * heads * head_dim
                 + 2 * tokens * kv_heads * head_dim) * element
    # Causal: query i of a sequence sees context_len - query_len + i + 1 keys; QK^T and PV, 2 FLOPs each.
    pairs = sum(q_len * (c_len - q_len) + q_len * (q_len + 1) // 2 for q_len, c_len in zip(query_lens, context_lens))
    flops = 4 * pairs * heads * head_dim
    expected = attention.paged_attention(q, k, v, pool, meta)
    results = []
    for method, fn in (("torch_reference", attention.paged_attention),
                       ("triton", triton_attention.paged_attention)):
        out = fn(q, k, v, pool, meta)
        error = ((out.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
        results.append(Result(case, method, measure(lambda fn=fn: fn(q, k, v, pool, meta)), num_bytes, flops,
                              max_error=error))
    return results


def fused_ops_cases(tokens: int, config: ModelConfig, dtype: torch.dtype, device: torch.device, measure,
                    generator: torch.Generator) -> list[Result]:
    """The fused small ops (`kernels/triton_fused.py`) against the torch ops the reference model runs:
    residual add + RMSNorm, rotary of q/k + K/V write into the pool; `tokens` rows each."""
    from slora.kernels import triton_fused
    from slora.kernels.attention import write_kv
    from slora.kernels import fused
    from slora.models.llama import RotaryEmbedding

    randn = lambda *size: torch.randn(*size, generator=generator).to(device, dtype)  # noqa: E731
    hidden = config.hidden_size
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    element = torch.empty((), dtype=dtype).element_size()
    weight, eps = 1 + randn(hidden), 1e-5
    x, residual = randn(tokens, hidden), randn(tokens, hidden)
    rotary = RotaryEmbedding(config, 8192).to(device)
    q, k, v = randn(tokens, heads, head_dim), randn(tokens, kv_heads, head_dim), randn(tokens, kv_heads, head_dim)
    positions = torch.randint(0, 8192, (tokens,), generator=generator).to(device)
    slots = torch.randperm(2 * tokens, generator=generator)[:tokens].to(device)
    pool = randn(2 * tokens, 2, kv_heads, head_dim)

    def torch_rotary(out_pool: torch.Tensor = pool):
        rotated_q, rotated_k = fused.rotate(q, k, positions, rotary.cos, rotary.sin)
        write_kv(out_pool, slots, rotated_k, v)
        return rotated_q, out_pool

    def triton_rotary(out_q: torch.Tensor = q, out_k: torch.Tensor = k, out_pool: torch.Tensor = pool):
        triton_fused.rotate_and_write_kv(out_q, out_k, v, positions, rotary.cos, rotary.sin, out_pool, slots)
        return out_q, out_pool

    def torch_norm():
        return fused.add_rms_norm(x, weight, eps, residual)[0]

    def triton_norm(out_residual: torch.Tensor = residual):
        return triton_fused.add_rms_norm(x, weight, eps, out_residual)[0]

    q_bytes, kv_bytes = tokens * heads * head_dim, tokens * kv_heads * head_dim
    # case: (torch reference, fused op, bytes moved, and the two again on copies of what they write in place)
    ops = {
        f"rms_norm_residual[{tokens} tokens]": (
            torch_norm, triton_norm, (4 * tokens * hidden + hidden) * element, torch_norm,
            lambda: triton_norm(residual.clone())),
        f"rotary_kv_write[{tokens} tokens]": (
            torch_rotary, triton_rotary, (2 * q_bytes + 4 * kv_bytes) * element + tokens * head_dim * 4,
            lambda: torch_rotary(pool.clone()), lambda: triton_rotary(q.clone(), k.clone(), pool.clone())),
    }
    results = []
    for case, (reference, fused_op, num_bytes, reference_on_copies, fused_on_copies) in ops.items():
        expected, got = reference_on_copies(), fused_on_copies()
        pairs = zip(expected, got) if isinstance(expected, tuple) else [(expected, got)]
        error = max(((b.float() - a.float()).abs().max() / a.float().abs().max()).item() for a, b in pairs)
        results.append(Result(case, "torch_reference", measure(reference), num_bytes, 0))
        results.append(Result(case, "triton", measure(fused_op), num_bytes, 0, max_error=error))
    return results


# --- the whole benchmark ------------------------------------------------------------------------------
def commit_of_checkout() -> str:
    """$SLORA_COMMIT when set (a copied tree's git metadata can be older than its files), else `git rev-parse`."""
    if os.environ.get("SLORA_COMMIT"):
        return os.environ["SLORA_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, Triton interpreter)"


def run(settings: Settings, device: torch.device, log=print) -> Report:
    config = model_shape(settings.model_shape)
    dtype = _DTYPES[settings.dtype]
    measure = timer(device)
    generator = torch.Generator().manual_seed(0)
    import triton

    # The serving bench's measure (an eager copy): a copy captured in a graph runs as a memcpy node, which
    # reached 2.7 TB/s on an H200 against 4.2 for the eager copy, and made kernels look closer to the limit.
    copy_gbps = measure_copy_bandwidth(device, settings.copy_bytes) / 1e9
    peak = matmul_peak(device, dtype, settings.matmul_size, measure)
    same_size_copy = SameSizeCopy(device, dtype, measure)
    log(f"device {device_name(device)}: copy {copy_gbps:.0f} GB/s, {settings.dtype} matmul {peak:.1f} TFLOP/s")
    report = Report(device_name(device), commit_of_checkout(), datetime.datetime.now(datetime.UTC).isoformat(),
                    torch.__version__, triton.__version__, asdict(settings), copy_gbps, peak)
    ranks = [settings.ranks[i % len(settings.ranks)] for i in range(settings.decode_adapters)]
    decode_adapters = [i % settings.decode_adapters for i in range(settings.decode_tokens)]
    order = torch.randperm(settings.decode_tokens, generator=generator).tolist()
    decode_adapters = [decode_adapters[i] for i in order]  # tokens of one adapter scattered in the batch
    distinct_ranks = [settings.ranks[i % len(settings.ranks)] for i in range(settings.decode_tokens)]
    cases = [
        lambda: lora_case(f"lora_decode[{settings.decode_tokens} tokens, {settings.decode_adapters} adapters]",
                          decode_adapters, ranks, config, dtype, device, measure, generator, settings.sweep),
    ]
    if settings.decode_adapters_all_distinct:
        cases.append(lambda: lora_case(
            f"lora_decode[{settings.decode_tokens} tokens, {settings.decode_tokens} adapters]",
            list(range(settings.decode_tokens)), distinct_ranks, config, dtype, device, measure, generator,
            settings.sweep))
    cases += [
        lambda: lora_case(f"lora_prefill[{sum(settings.prefill_segments)} tokens, "
                          f"{len(settings.prefill_segments)} adapters]",
                          [j for j, n in enumerate(settings.prefill_segments) for _ in range(n)],
                          [settings.ranks[j % len(settings.ranks)] for j in range(len(settings.prefill_segments))],
                          config, dtype, device, measure, generator, settings.sweep),
    ]
    mixed_tokens = list(range(settings.mixed_decode)) + [settings.mixed_decode + j
                                                         for j, n in enumerate(settings.mixed_prefill) for _ in range(n)]
    mixed_name = f"{settings.mixed_decode} decode + {'/'.join(map(str, settings.mixed_prefill))} prefill"
    cases.append(lambda: lora_case(
        f"lora_mixed[{mixed_name} tokens, {mixed_tokens[-1] + 1} adapters]", mixed_tokens,
        [settings.ranks[j % len(settings.ranks)] for j in range(mixed_tokens[-1] + 1)], config, dtype, device,
        measure, generator, False))
    cases.append(lambda: attention_case(
        f"attention_mixed[{mixed_name} after {settings.mixed_context}]",
        [1] * settings.mixed_decode + list(settings.mixed_prefill),
        [settings.mixed_context] * settings.mixed_decode + [n + settings.mixed_context for n in settings.mixed_prefill],
        config, dtype, device, measure, generator))
    for context in settings.contexts:
        cases.append(lambda context=context: attention_case(
            f"attention_decode[{settings.decode_seqs} seqs x {context} context]", [1] * settings.decode_seqs,
            [context] * settings.decode_seqs, config, dtype, device, measure, generator))
    cases.append(lambda: attention_case(
        f"attention_prefill[{len(settings.prefill_seqs)} seqs, {sum(settings.prefill_seqs)} tokens]",
        list(settings.prefill_seqs), list(settings.prefill_seqs), config, dtype, device, measure, generator))
    cases.append(lambda: fused_ops_cases(settings.decode_tokens, config, dtype, device, measure, generator))
    for case in cases:
        results = [_finish(r, copy_gbps, peak, same_size_copy) for r in case()]
        reference = {r.case: r.time_us for r in results if r.method == "torch_reference"}
        for r in results:
            if r.case in reference and "[" not in r.method:
                r.speedup_vs_reference = reference[r.case] / r.time_us
            log(f"  {r.case:<48} {r.method:<32} {r.time_us:10.1f} us {r.gbps:8.1f} GB/s "
                f"({r.pct_copy_bandwidth:5.1f}% copy, {r.pct_same_size_copy:5.1f}% same-size copy) "
                f"{r.tflops:7.2f} TFLOP/s")
        report.results += results
    return report


def write_report(report: Report, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "kernels.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    lines = [
        f"# Kernel benchmark: {report.settings['model_shape']}, {report.settings['dtype']}",
        "",
        f"- device: {report.device}",
        f"- commit: {report.commit}",
        f"- date: {report.date}; torch {report.torch}, triton {report.triton}",
        f"- copy bandwidth (device-to-device copy, read + write): {report.copy_bandwidth_gbps:.0f} GB/s",
        f"- matmul peak ({report.settings['matmul_size']}^3 {report.settings['dtype']}): "
        f"{report.matmul_peak_tflops:.1f} TFLOP/s",
        "",
        "Bandwidth is over the bytes the op must move (distinct adapters' A and B once, x, y read and "
        "written; each context's K/V once), whatever the method reads in fact. \"% same-size copy\" is of what an "
        "elementwise copy kernel moving those bytes reaches, timed the same way: small launches cannot reach the "
        "large copy's rate. A LoRA case's `copy_per_launch_bound` row is one copy per launch of the op, each moving that "
        "launch's bytes, in one graph: the % of copy bandwidth an op of those launches would reach if each were as fast "
        "as a copy of its size.",
        "",
        "| case | method | time (us) | GB/s | % copy BW | % same-size copy | TFLOP/s | % matmul peak | vs reference "
        "| max rel. error | config |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report.results:
        speedup = f"{r.speedup_vs_reference:.2f}x" if r.speedup_vs_reference else ""
        error = f"{r.max_error:.1e}" if r.max_error is not None else ""
        lines.append(f"| {r.case} | {r.method} | {r.time_us:.1f} | {r.gbps:.1f} | {r.pct_copy_bandwidth:.1f} | "
                     f"{r.pct_same_size_copy:.1f} | {r.tflops:.2f} | {r.pct_matmul_peak:.1f} | {speedup} | {error} "
                     f"| {r.config or ''} |")
    (output / "kernels.md").write_text("\n".join(lines) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    parser.add_argument("--output", default=None, help="folder for kernels.json and kernels.md "
                        "(default: bench/results/kernels-<date>)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu (interpreter)")
    parser.add_argument("--dtype", default=None, choices=list(_DTYPES), help=f"default: {defaults.dtype}")
    parser.add_argument("--model-shape", default=None, help=f"default: {defaults.model_shape}")
    parser.add_argument("--decode-tokens", type=int, default=None)
    parser.add_argument("--decode-adapters", type=int, default=None)
    parser.add_argument("--ranks", default=None, help="comma-separated adapter ranks, cycled (default: 8,16,32,64)")
    parser.add_argument("--contexts", default=None, help="decode attention contexts (default: 1024,4096)")
    parser.add_argument("--decode-seqs", type=int, default=None)
    parser.add_argument("--sweep", action="store_true",
                        help="also sweep the LoRA kernels' block sizes and splits (segment form)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: runs on the CPU under the interpreter")


def settings_of(args: argparse.Namespace) -> Settings:
    settings = Settings.tiny() if args.tiny else Settings()
    settings.sweep = args.sweep
    updates = {"dtype": args.dtype, "model_shape": args.model_shape, "decode_tokens": args.decode_tokens,
               "decode_adapters": args.decode_adapters, "decode_seqs": args.decode_seqs,
               "ranks": tuple(int(r) for r in args.ranks.split(",")) if args.ranks else None,
               "contexts": tuple(int(c) for c in args.contexts.split(",")) if args.contexts else None}
    for name, value in updates.items():
        if value is not None:
            setattr(settings, name, value)
    return settings


def run_from_args(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined, on first import
    settings = settings_of(args)
    output = Path(args.output or f"bench/results/kernels-{datetime.date.today().isoformat()}")
    report = run(settings, device)
    write_report(report, output)
    print(f"wrote {output / 'kernels.json'} and {output / 'kernels.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slora bench kernels", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
