"""Engine steps as CUDA graphs, replayed over static metadata buffers.

A step launches a few hundred small kernels; issuing them from Python costs more than the GPU takes
to run them at the batch sizes that matter (an H100 profile of the offline headline workload: 30 ms
of host time for a mixed step of base-only whose kernels took 28 ms, 50 ms for slora's 45). A
captured graph issues them all in one call. What a graph reads must be at the same addresses, with
the same launch grids, at every replay, so:

- every step's tensors (tokens, positions, slots, the slot table, the LoRA tables of
  `kernels/lora.py::LoRABatch`, the kernels' work items) are copied into buffers made once, sized
  for the largest graph (the LoRA tables are one buffer, filled on the host from the step's numpy
  tables and copied in one go);
- launch sizes come from limits, never from the batch: the longest context (`max_context`), the
  largest LoRA rank (`max_lora_rank`), the most rows, tokens and work items a graph can hold.
  Programs past the batch's work exit at once (empty segments, rank-0 adapter columns, work items
  past a row's queries).

Two kinds of graphs, each with and without LoRA (the backend's Triton LoRA form):

- decode: a batch of B sequences of one new token each runs the graph of the smallest bucket >= B
  (1, 2, 4, ... up to `max_batch`); rows past B are padding (token 0 at position 0, attending to
  one scratch slot of the pool that no request owns).
- mixed (any step with a prompt chunk, prefill alone included): T tokens run the graph of the
  smallest token bucket >= T (up to `max_tokens`, the step's token budget). Its slot table has
  `max_batch` decode rows (the decode kernel) then `prefill_rows` prefill rows (the prefill
  kernel, whose work items are (row, query block)); padding decode rows attend to the scratch slot
  from one padding token past the bucket's, padding prefill rows have no query. A step with more
  prompt chunks runs eagerly. Padding tokens past T that no row attends from compute on whatever
  their attention output holds; no kernel mixes rows, and no step samples them.

Graphs are recorded on first use, or all at start-up (`record_all`, which the engine calls unless
`EngineConfig.capture_graphs_at_start` is off) so that no measured step pays for a capture; the
static tables then hold no adapter (every rank 0), which the kernels skip.

`capture=False` (the CPU, in tests) runs the same static batch eagerly: what a graph would record,
so that a CPU test proves the buffers are filled right and the launches never depend on the batch.
A failed capture turns graphs off with a warning: steps then run eagerly, as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from slora.kernels.backend import TritonBackend
from slora.kernels.lora import LoRABatch, LoRATables
from slora.kernels.metadata import AttentionMetadata, ForwardBatch, SlotTable

logger = logging.getLogger("slora.engine")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # decode graphs: sequences
# Mixed graphs: tokens. Halfway steps above 256, so a step pays for at most half again its tokens.
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)
MAX_PREFILL_ROWS = 32  # prompt chunks in one mixed graph (no more than max_batch)
# The segment kernels' tokens per block in mixed graphs, whatever the step (eager steps of long segments
# take 64): the graph's work items are made for it.
LORA_BLOCK_M = 16
_PAST = 1 << 20  # a work item's block index past any row or segment: its program exits at once
Key = tuple[str, int]  # ("decode", sequences) or ("mixed", tokens)
Recorded = tuple[torch.cuda.CUDAGraph | None, ForwardBatch, torch.Tensor | None]  # graph, static batch, logits


@dataclass
class GraphLimits:
    """What bounds every captured step: launch sizes are derived from these, never from a batch."""

    max_batch: int  # sequences in the largest decode bucket, and decode rows of a mixed graph
    max_context: int  # slots per sequence (longer contexts run eagerly)
    max_lora_rank: int
    row_capacity: int  # entries of the concatenated row table (all of the pool's rows)
    num_layers: int
    num_modules: int  # the architecture's LoRA targets: the module axis of the LoRA tables
    scale: float  # attention's softmax scale
    max_tokens: int = 0  # tokens of the largest mixed graph (the step's token budget); 0: no mixed graphs


class StaticRows:
    """A slot table's buffers, for the largest graph of one kind: the rows its graphs read."""

    def __init__(self, num_rows: int, max_context: int, scratch_slot: int, device: torch.device):
        int32 = torch.int32
        self.slots = torch.full((num_rows, max_context), scratch_slot, dtype=int32, device=device)
        self.context_lens = torch.ones(num_rows, dtype=int32, device=device)
        self.query_starts = torch.arange(num_rows, dtype=int32, device=device)
        self.query_lens = torch.ones(num_rows, dtype=int32, device=device)

    def table(self, start: int, end: int, max_query_len: int, max_context: int, num_decode: int,
              items: torch.Tensor | None = None) -> SlotTable:
        return SlotTable(self.slots[start:end], self.context_lens[start:end], self.query_starts[start:end],
                         self.query_lens[start:end], max_query_len, max_context, num_decode,
                         max_context if num_decode else 0, items=items)

    def copy_rows(self, at: int, table: SlotTable, start: int, end: int) -> None:
        """Rows `[start, end)` of a step's table into rows `at..` (its context width only)."""
        n, width = end - start, table.max_context_len
        self.slots[at : at + n, :width].copy_(table.slots[start:end, :width])
        self.context_lens[at : at + n].copy_(table.context_lens[start:end])
        self.query_starts[at : at + n].copy_(table.query_starts[start:end])
        self.query_lens[at : at + n].copy_(table.query_lens[start:end])


class StaticItems:
    """A kernel's work items, (row or segment, block) pairs, for the largest graph: a pinned host copy
    filled per step (past the step's items: items whose block is past everything) and copied at once."""

    def __init__(self, capacity: int, device: torch.device):
        self.host = torch.full((capacity, 2), _PAST, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.host[:, 0] = 0
        self.device = self.host.to(device)
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

    def fill(self, items: np.ndarray, size: int) -> None:
        if len(items) > size:
            raise ValueError(f"{len(items)} work items do not fit the graph's {size}")
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has read the pinned buffer
        host = self.host.numpy()
        host[: len(items)] = items
        host[len(items) : size] = (0, _PAST)
        self.device[:size].copy_(self.host[:size], non_blocking=True)
        if self._copied is not None:
            self._copied.record()


class StepGraphs:
    def __init__(self, model: torch.nn.Module, kv_cache: list[torch.Tensor], limits: GraphLimits,
                 scratch_slot: int, backend: TritonBackend, capture: bool):
        self.model = model
        self.backend = backend
        self.kv_cache = kv_cache
        self.limits = limits
        self.scratch_slot = scratch_slot
        self.capture = capture
        self.enabled = True
        self.replays = 0  # steps run through a graph's static batch (a graph, when capturing)
        self.buckets = tuple(b for b in BUCKETS if b < limits.max_batch) + (limits.max_batch,)
        self.token_buckets = (tuple(b for b in TOKEN_BUCKETS if b < limits.max_tokens) + (limits.max_tokens,)
                              if limits.max_tokens else ())
        device = kv_cache[0].device
        # Mixed rows: `max_batch` decode rows, then the prefill rows; their tokens end with one padding token.
        self.prefill_rows = min(MAX_PREFILL_ROWS, limits.max_batch)
        self.mixed_rows = limits.max_batch + self.prefill_rows
        n = max(limits.max_batch, limits.max_tokens + 1)  # tokens of the largest graph
        int64 = torch.int64
        self.input_ids, self.positions = torch.zeros(n, dtype=int64, device=device), torch.zeros(n, dtype=int64,
                                                                                                  device=device)
        self.slot_mapping = torch.full((n,), scratch_slot, dtype=int64, device=device)
        self.decode_logits = torch.arange(limits.max_batch, dtype=int64, device=device)  # row i is token i
        self.mixed_logits = torch.zeros(self.mixed_rows, dtype=int64, device=device)
        self.decode_rows = StaticRows(limits.max_batch, limits.max_context, scratch_slot, device)
        self.prefill_items = self.lora_items = None
        if self.token_buckets:
            self.rows = StaticRows(self.mixed_rows, limits.max_context, scratch_slot, device)
            # Until a step fills them (a capture runs the graph before any step): every row's query is
            # token 0, the one token every graph has, and the prefill rows have none.
            self.rows.query_starts.zero_()
            self.rows.query_lens[limits.max_batch :] = 0
            self.prefill_items = StaticItems(self._prefill_items_size(limits.max_tokens), device)
            self.lora_items = StaticItems(limits.max_tokens // LORA_BLOCK_M + self.mixed_rows, device)
        modules, layers, on_cuda = limits.num_modules, limits.num_layers, device.type == "cuda"
        # The LoRA tables: filled on the host (pinned) and copied into one device buffer per step.
        width = max(limits.max_batch, self.mixed_rows + 1 if self.token_buckets else 0)
        host = LoRATables(limits.row_capacity, layers, modules, width, n, pin_memory=on_cuda)
        self._lora_buffer = torch.zeros(host.buffer.numel(), dtype=torch.int32, device=device)
        self.lora = LoRABatch(adapters=[], **host.views(self._lora_buffer),
                              max_ranks=[[limits.max_lora_rank] * modules for _ in range(layers)], max_segment_len=1,
                              host=host)
        # Decode graphs' programs along the tokens: one per segment, each looping over its tokens.
        m = limits.max_batch
        self.decode_items = torch.stack([torch.arange(m, dtype=torch.int32), torch.zeros(m, dtype=torch.int32)],
                                        dim=1).to(device)
        self._lora_copied = torch.cuda.Event() if on_cuda else None  # the last copy out of the pinned tables
        self._graphs: dict[tuple[str, int, bool], Recorded] = {}  # by (kind, size, with LoRA)
        self._mempool = torch.cuda.graph_pool_handle() if capture else None

    # --- which steps ------------------------------------------------------------------------------
    def bucket(self, batch: ForwardBatch) -> Key | None:
        """The graph that runs this step, or None when it must run eagerly."""
        table = batch.attention.slot_table
        if not self.enabled or table is None or table.max_context_len > self.limits.max_context:
            return None
        # Ranks need no check (the registry refuses ranks above max_lora_rank) nor row tables (at most
        # every pool row, the capacity).
        num_seqs, num_tokens = table.slots.shape[0], batch.input_ids.numel()
        if table.max_query_len == 1:
            size = next((b for b in self.buckets if b >= num_seqs), None)
            return None if size is None or num_seqs != num_tokens else ("decode", size)
        if num_seqs - table.num_decode > self.prefill_rows or table.num_decode > self.limits.max_batch:
            return None
        size = next((b for b in self.token_buckets if b >= num_tokens), None)
        return None if size is None else ("mixed", size)

    # --- one step ---------------------------------------------------------------------------------
    def run(self, batch: ForwardBatch, key: Key) -> torch.Tensor:
        """Logits of `batch.logits_indices`, computed by the key's graph over the static buffers."""
        kind, size = key
        (self._fill_decode if kind == "decode" else self._fill_mixed)(batch, size)
        graph, static_batch, logits = self._graph(kind, size, batch.lora is not None)
        self.replays += 1
        if graph is None:
            logits = self.model(static_batch)
        else:
            graph.replay()
        if kind == "decode":  # row i is token i
            return logits[batch.logits_indices]
        return logits[: batch.logits_indices.numel()]

    def _fill_tokens(self, batch: ForwardBatch, end: int) -> None:
        """The step's tokens, then padding ones up to `end`: token 0 at position 0, written to the scratch slot."""
        n = batch.input_ids.numel()
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.attention.slot_mapping)
        if end > n:
            self.input_ids[n:end] = 0
            self.positions[n:end] = 0
            self.slot_mapping[n:end] = self.scratch_slot

    def _fill_decode(self, batch: ForwardBatch, bucket: int) -> None:
        table = batch.attention.slot_table
        n, width, rows = table.slots.shape[0], table.max_context_len, self.decode_rows
        self._fill_tokens(batch, bucket)
        rows.slots[:n, :width].copy_(table.slots[:, :width])
        rows.context_lens[:n].copy_(table.context_lens)
        if bucket > n:  # padding rows: their token's one slot is the scratch slot
            rows.slots[n:bucket, 0] = self.scratch_slot
            rows.context_lens[n:bucket] = 1
        if batch.lora is not None:
            self._fill_lora(batch.lora.batch, bucket, bucket)

    def _fill_mixed(self, batch: ForwardBatch, size: int) -> None:
        from slora.kernels.triton_attention import prefill_block_m

        table, rows, decode = batch.attention.slot_table, self.rows, self.limits.max_batch
        n, num_decode = table.slots.shape[0], table.num_decode
        self._fill_tokens(batch, size + 1)
        rows.copy_rows(0, table, 0, num_decode)
        if num_decode < decode:  # padding decode rows: the padding token, attending to the scratch slot
            rows.slots[num_decode:decode, 0] = self.scratch_slot
            rows.context_lens[num_decode:decode] = 1
            rows.query_starts[num_decode:decode] = size
            rows.query_lens[num_decode:decode] = 1
        rows.copy_rows(decode, table, num_decode, n)
        rows.query_lens[decode + n - num_decode :] = 0  # padding prefill rows: no query
        prompts = table.parts()[1]
        self.prefill_items.fill(prompts.host_prefill_items(prefill_block_m(size, self.input_ids.device)),
                                self._prefill_items_size(size))
        sampled = batch.logits_indices.numel()
        self.mixed_logits[:sampled].copy_(batch.logits_indices)
        self.mixed_logits[sampled:] = 0
        if batch.lora is not None:
            lora = batch.lora.batch
            config = self._lora_config(size)
            self.lora_items.fill(lora.host_work_items(config.block_m, config.m_splits), self._lora_items_size(size))
            self._fill_lora(lora, size, self.mixed_rows + 1)

    def _fill_lora(self, lora: LoRABatch, token_slots: int, segment_slots: int) -> None:
        """The step's host tables into the static ones, on the host, then one copy to the device. The
        graph has `segment_slots` segments (those past the step's are empty) and `token_slots` LoRA tokens
        (the token form's programs past the step's read an adapter column of rank 0)."""
        if self._lora_copied is not None:
            self._lora_copied.synchronize()  # the last step's copy has read the pinned buffer
        host = self.lora.host
        static, step = host.arrays, lora.host.arrays
        segments, tokens, rows = lora.num_segments, lora.num_tokens, step["row_table"].size
        static["row_table"][:rows] = step["row_table"]
        for name in ("a_offsets", "b_offsets", "ranks", "scalings"):
            static[name][..., :segments] = step[name]
        static["token_indices"][:tokens] = step["token_indices"]
        static["token_adapters"][:tokens] = step["token_adapters"]
        static["segment_starts"][: segments + 1] = step["segment_starts"]
        static["segment_starts"][segments + 1 : segment_slots + 1] = tokens  # the graph's other segments: empty
        if tokens < token_slots:
            static["token_adapters"][tokens:token_slots] = segments
            static["ranks"][:, :, segments] = 0
        end = host.end(rows)
        self._lora_buffer[:end].copy_(host.buffer[:end], non_blocking=True)
        if self._lora_copied is not None:
            self._lora_copied.record()

    # --- sizes of a mixed graph -------------------------------------------------------------------
    def _prefill_items_size(self, size: int) -> int:
        """Prefill work items of a graph of `size` tokens: at most one per 16 queries plus one per row."""
        return size // 16 + self.prefill_rows

    def _lora_items_size(self, size: int) -> int:
        return size // LORA_BLOCK_M + self.mixed_rows

    @staticmethod
    def _lora_config(size: int):
        """The segment kernels' token blocks in a mixed graph, fixed: its work items are made for them."""
        from slora.kernels.triton_lora import LoRAKernelConfig

        return LoRAKernelConfig(block_m=LORA_BLOCK_M, m_splits=-(-size // LORA_BLOCK_M))

    @property
    def captured(self) -> int:
        """Graphs recorded so far (at start-up or on first use)."""
        return sum(graph is not None for graph, _, _ in self._graphs.values())

    # --- capture ----------------------------------------------------------------------------------
    def record_all(self) -> None:
        """Record every graph now, with and without LoRA, so that no step pays for a capture. Stops at
        a failed capture (graphs off)."""
        keys = [("decode", b) for b in self.buckets] + [("mixed", t) for t in self.token_buckets]
        for kind, size in keys:
            for with_lora in (False, True):
                if not self.enabled:
                    return
                try:
                    self._graph(kind, size, with_lora)
                except torch.OutOfMemoryError:  # this one is recorded on its first step instead
                    logger.warning("no device memory to capture the %s graph of %d at start-up", kind, size)

    def _graph(self, kind: str, size: int, with_lora: bool) -> Recorded:
        """(graph, static batch, its logits) of a graph, recorded on first use."""
        key = (kind, size, with_lora)
        if key not in self._graphs:
            self._graphs[key] = self._record(kind, size, with_lora)
        return self._graphs[key]

    def _static_batch(self, kind: str, size: int, with_lora: bool) -> ForwardBatch:
        limits, s = self.limits, self.lora
        if kind == "decode":
            tokens, segments, logits_indices = size, size, self.decode_logits[:size]
            table = self.decode_rows.table(0, size, 1, limits.max_context, size)
            items, max_segment_len, config = self.decode_items[:size], 1, None
        else:
            tokens, segments, logits_indices = size + 1, self.mixed_rows + 1, self.mixed_logits
            table = self.rows.table(0, self.mixed_rows, size, limits.max_context, limits.max_batch,
                                    items=self.prefill_items.device[: self._prefill_items_size(size)])
            items, max_segment_len = self.lora_items.device[: self._lora_items_size(size)], size
            config = self._lora_config(size)
        attention = AttentionMetadata(self.slot_mapping[:tokens], table, limits.scale)
        lora = None
        if with_lora:
            lora_tokens = tokens if kind == "decode" else size
            view = LoRABatch([], s.row_table, s.a_offsets, s.b_offsets, s.ranks, s.scalings,
                             s.token_indices[:lora_tokens], s.token_adapters[:lora_tokens],
                             s.segment_starts[: segments + 1], s.max_ranks, max_segment_len, items=items)
            lora = self.backend.lora_op(self.kv_cache, view, config=config)
        return ForwardBatch(self.input_ids[:tokens], self.positions[:tokens], logits_indices, attention,
                            self.kv_cache, self.backend, lora)

    def _record(self, kind: str, size: int, with_lora: bool) -> Recorded:
        static_batch = self._static_batch(kind, size, with_lora)
        if not self.capture:
            return None, static_batch, None
        try:
            self.model(static_batch)  # compiles the kernels and fills every cache before capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool):
                logits = self.model(static_batch)
            return graph, static_batch, logits
        except torch.OutOfMemoryError:  # passing: the step backs off (engine) and a later one records it
            raise
        except Exception:
            logger.warning("capturing the %s graph of %d failed; steps run without CUDA graphs", kind, size,
                           exc_info=True)
            self.enabled = False
            return None, static_batch, None


__all__ = ["BUCKETS", "GraphLimits", "MAX_PREFILL_ROWS", "StepGraphs", "TOKEN_BUCKETS"]
