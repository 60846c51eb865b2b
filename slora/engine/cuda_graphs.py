"""Decode steps as CUDA graphs: one per batch-size bucket, replayed over static metadata buffers.

A decode step launches a few hundred small kernels; issuing them from Python costs more than the
GPU takes to run them at the batch sizes that matter. A captured graph issues them all in one call.
What a graph reads must be at the same addresses, with the same launch grids, at every replay, so:

- every step's tensors (tokens, positions, slots, the slot table, the LoRA tables of
  `kernels/lora.py::LoRABatch`) are copied into buffers made once, sized for the largest bucket (the
  LoRA tables are one buffer, filled on the host from the step's numpy tables and copied in one go);
- a batch of B sequences runs the graph of the smallest bucket >= B; rows past B are padding (token
  0 at position 0, attending to one scratch slot of the pool that no request owns);
- launch sizes come from limits, never from the batch: the longest context (`max_context`), the
  largest LoRA rank (`max_lora_rank`), one segment and one LoRA token per row (segments past the
  batch's adapters are empty, and token-form programs past its LoRA tokens read an adapter column
  of rank 0: both exit at once). Graphs are kept per bucket and LoRA form (or none).

Graphs are recorded on a bucket's first step, or all at start-up (`record_all`, which the engine
calls unless `EngineConfig.capture_graphs_at_start` is off) so that no measured step pays for a
capture; the static tables then hold no adapter (every rank 0), which the kernels skip.

`capture=False` (the CPU, in tests) runs the same static batch eagerly: what a graph would record,
so that a CPU test proves the buffers are filled right and the launches never depend on the batch.
A failed capture turns graphs off with a warning: steps then run eagerly, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from slora.kernels.lora import MODULES, LoRABatch, LoRATables
from slora.kernels.metadata import AttentionMetadata, ForwardBatch, SlotTable

logger = logging.getLogger("slora.engine")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
Recorded = tuple[torch.cuda.CUDAGraph | None, ForwardBatch, torch.Tensor | None]  # graph, static batch, logits


@dataclass
class GraphLimits:
    """What bounds every captured step: launch sizes are derived from these, never from a batch."""

    max_batch: int  # sequences in the largest bucket
    max_context: int  # slots per sequence (longer contexts run eagerly)
    max_lora_rank: int
    row_capacity: int  # entries of the concatenated row table (all of the pool's rows)
    num_layers: int
    scale: float  # attention's softmax scale


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_cache: list[torch.Tensor], limits: GraphLimits,
                 scratch_slot: int, capture: bool):
        self.model = model
        self.kv_cache = kv_cache
        self.limits = limits
        self.scratch_slot = scratch_slot
        self.capture = capture
        self.enabled = True
        self.replays = 0  # decode steps run through a bucket's static batch (a graph, when capturing)
        self.buckets = tuple(b for b in BUCKETS if b < limits.max_batch) + (limits.max_batch,)
        device = kv_cache[0].device
        n, int32, int64 = limits.max_batch, torch.int32, torch.int64
        zeros = lambda *shape, dtype=int32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.input_ids, self.positions = zeros(n, dtype=int64), zeros(n, dtype=int64)
        self.slot_mapping = torch.full((n,), scratch_slot, dtype=int64, device=device)
        self.logits_indices = torch.arange(n, dtype=int64, device=device)
        self.slots = torch.full((n, limits.max_context), scratch_slot, dtype=int32, device=device)
        self.context_lens = torch.ones(n, dtype=int32, device=device)
        self.query_starts = torch.arange(n, dtype=int32, device=device)
        self.query_lens = torch.ones(n, dtype=int32, device=device)
        modules, layers, on_cuda = len(MODULES), limits.num_layers, device.type == "cuda"
        # The LoRA tables: filled on the host (pinned) and copied into one device buffer per step.
        host = LoRATables(limits.row_capacity, layers, n, n, pin_memory=on_cuda)
        self._lora_buffer = zeros(host.buffer.numel())
        self.lora = LoRABatch(adapters=[], **host.views(self._lora_buffer),
                              max_ranks=[[limits.max_lora_rank] * modules for _ in range(layers)], max_segment_len=1,
                              host=host)
        # The segment kernels' programs along the tokens: one per segment, each looping over its tokens.
        self.lora_items = torch.stack([torch.arange(n, dtype=int32), torch.zeros(n, dtype=int32)], dim=1).to(device)
        self._lora_copied = torch.cuda.Event() if on_cuda else None  # the last copy out of the pinned tables
        self._graphs: dict[tuple[int, str | None], Recorded] = {}  # by (bucket, LoRA form or None)
        self._mempool = torch.cuda.graph_pool_handle() if capture else None

    # --- which steps ------------------------------------------------------------------------------
    def bucket(self, batch: ForwardBatch) -> int | None:
        """The bucket that runs this step, or None when it must run eagerly."""
        table = batch.attention.slot_table
        if not self.enabled or table is None or table.max_query_len != 1:
            return None
        num_seqs = table.slots.shape[0]
        # Ranks need no check (the registry refuses ranks above max_lora_rank) nor row tables (at most
        # every pool row, the capacity).
        if num_seqs != batch.input_ids.numel() or table.max_context_len > self.limits.max_context:
            return None
        return next((b for b in self.buckets if b >= num_seqs), None)

    # --- one step ---------------------------------------------------------------------------------
    def run(self, batch: ForwardBatch, bucket: int) -> torch.Tensor:
        """Logits of `batch.logits_indices`, computed by the bucket's graph over the static buffers."""
        lora_form = batch.lora.form if batch.lora is not None else None  # the Triton LoRA form, or none
        self._fill(batch, bucket)
        graph, static_batch, logits = self._graph(bucket, lora_form)
        self.replays += 1
        if graph is None:
            logits = self.model(static_batch)
        else:
            graph.replay()
        return logits[batch.logits_indices]

    def _fill(self, batch: ForwardBatch, bucket: int) -> None:
        table = batch.attention.slot_table
        n, width = table.slots.shape[0], table.max_context_len
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.attention.slot_mapping)
        self.slots[:n, :width].copy_(table.slots[:, :width])
        self.context_lens[:n].copy_(table.context_lens)
        if bucket > n:  # padding rows: token 0 at position 0, its one slot the scratch slot
            self.input_ids[n:bucket] = 0
            self.positions[n:bucket] = 0
            self.slot_mapping[n:bucket] = self.scratch_slot
            self.slots[n:bucket, 0] = self.scratch_slot
            self.context_lens[n:bucket] = 1
        if batch.lora is not None:
            self._fill_lora(batch.lora.batch, bucket)

    def _fill_lora(self, lora: LoRABatch, bucket: int) -> None:
        """The step's host tables into the static ones, on the host, then one copy to the device."""
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
        static["segment_starts"][segments + 1 : bucket + 1] = tokens  # the rest of the bucket's segments: empty
        if tokens < bucket:  # the token form's programs past the LoRA tokens: an adapter column of rank 0
            static["token_adapters"][tokens:bucket] = segments
            static["ranks"][:, :, segments] = 0
        end = host.end(rows)
        self._lora_buffer[:end].copy_(host.buffer[:end], non_blocking=True)
        if self._lora_copied is not None:
            self._lora_copied.record()

    @property
    def captured(self) -> int:
        """Graphs recorded so far (one per bucket and LoRA form or none: at start-up or on first use)."""
        return sum(graph is not None for graph, _, _ in self._graphs.values())

    # --- capture ----------------------------------------------------------------------------------
    def record_all(self, lora_forms: Iterable[str]) -> None:
        """Record every bucket's graph now, without LoRA and with each Triton LoRA form in `lora_forms`
        ("segment", "token"), so that no step pays for a capture. Stops at a failed capture (graphs off)."""
        for bucket in self.buckets:
            for lora_form in (None, *lora_forms):
                if not self.enabled:
                    return
                try:
                    self._graph(bucket, lora_form)
                except torch.OutOfMemoryError:  # this one is recorded on its first step instead
                    logger.warning("no device memory to capture the decode graph of batch %d at start-up", bucket)

    def _graph(self, bucket: int, lora_form: str | None) -> Recorded:
        """(graph, static batch, its logits) of a bucket and LoRA form, recorded on first use."""
        key = (bucket, lora_form)
        if key not in self._graphs:
            self._graphs[key] = self._record(bucket, lora_form)
        return self._graphs[key]

    def _static_batch(self, bucket: int, lora_form: str | None) -> ForwardBatch:
        from slora.kernels.triton_lora import TritonLoRA

        table = SlotTable(self.slots[:bucket], self.context_lens[:bucket], self.query_starts[:bucket],
                          self.query_lens[:bucket], max_query_len=1, max_context_len=self.limits.max_context)
        attention = AttentionMetadata(self.slot_mapping[:bucket], list(range(bucket)), [1] * bucket, None,
                                      self.limits.scale, table)
        lora = None
        if lora_form is not None:
            s = self.lora
            view = LoRABatch([], s.row_table, s.a_offsets, s.b_offsets, s.ranks, s.scalings, s.token_indices[:bucket],
                             s.token_adapters[:bucket], s.segment_starts[: bucket + 1], s.max_ranks, 1,
                             items=self.lora_items[:bucket])
            lora = TritonLoRA(self.kv_cache, view, form=lora_form)
        return ForwardBatch(self.input_ids[:bucket], self.positions[:bucket], self.logits_indices[:bucket], attention,
                            self.kv_cache, lora, backend="triton")

    def _record(self, bucket: int, lora_form: str | None) -> Recorded:
        static_batch = self._static_batch(bucket, lora_form)
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
            logger.warning("capturing the decode graph of batch %d failed; decode steps run without CUDA graphs",
                           bucket, exc_info=True)
            self.enabled = False
            return None, static_batch, None


__all__ = ["BUCKETS", "DecodeGraphs", "GraphLimits"]
