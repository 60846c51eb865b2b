"""Which adapters are in the unified pool, where, and which may leave.

An adapter becomes resident when a request that names it is admitted: it takes `layout.num_slots`
slots next to the KV cache and its host rows are copied into those slots in every layer. Running
requests hold a reference to their adapter, so it cannot be evicted under them; an adapter with no
reference stays resident (a later request hits it) until its slots are needed, then the least
recently used idle adapter goes first.

Adapters of requests still waiting can be loaded ahead (`prefetch`), while the GPU computes: on CUDA
every load is issued on a copy stream of its own, after the compute work issued before it (see
`_load`), and the compute stream waits for it only when a request that uses the adapter is admitted
(`acquire`).

What a step's LoRA tables need of a resident adapter never changes while it is resident, so it is
built once (`ResidentAdapter.tables`, at load: a prefetch builds it while the GPU computes) rather
than in every step; a reloaded adapter is a new `ResidentAdapter`, so nothing cached outlives the
residency it describes.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from slora.lora.layout import RowLayout
from slora.lora.registry import AdapterRegistry
from slora.lora.store import HostStore
from slora.memory.pool import UnifiedPool


def slot_rows(slot_ids: list[int], num_rows: int) -> np.ndarray:
    """The first `num_rows` pool rows of `slot_ids`, in order: slot s holds rows 2s (K) and 2s + 1 (V)."""
    slots = np.asarray(slot_ids, dtype=np.int32)
    return np.stack((2 * slots, 2 * slots + 1), axis=1).ravel()[:num_rows]


@dataclass(frozen=True)
class AdapterTables:
    """One resident adapter's column of a step's LoRA tables (`kernels/lora.py::LoRABatch`), on the host.

    `column` holds every entry of that column in one int32 array, over the architecture's targets
    (its module axis): whether each module is targeted, its A and B^T offsets in the adapter's row
    table, then its [num_layers, num_modules] ranks and scalings (float32 bits); a step joins its
    adapters' columns with one numpy call (`side_by_side`) instead of one per table and adapter.
    """

    row_table: np.ndarray  # [num_rows] int32: canonical row -> pool row
    column: np.ndarray  # [(3 + 2 * num_layers) * num_modules] int32, as above

    @classmethod
    def of(cls, layout: RowLayout, layer_ranks: dict[tuple[int, str], int],
           layer_scalings: dict[tuple[int, str], float], row_table: np.ndarray, module_index: dict[str, int],
           num_layers: int) -> "AdapterTables":
        """The tables of an adapter laid out by `layout` in the pool rows `row_table`, over the module
        axis `module_index` (the architecture's `index`)."""
        modules = len(module_index)
        offsets = np.zeros((3, modules), dtype=np.int32)  # targeted (0/1), A's offset, B^T's offset
        for module, rows in layout.modules.items():
            offsets[:, module_index[module]] = (1, rows.a_start, rows.b_start)
        ranks = np.zeros((num_layers, modules), dtype=np.int32)
        scalings = np.zeros((num_layers, modules), dtype=np.float32)
        for (layer, module), rank in layer_ranks.items():
            ranks[layer, module_index[module]] = rank
            scalings[layer, module_index[module]] = layer_scalings[(layer, module)]
        column = np.concatenate((offsets.ravel(), ranks.ravel(), scalings.view(np.int32).ravel()))
        return cls(np.asarray(row_table, dtype=np.int32), column)

    @staticmethod
    def side_by_side(tables: list["AdapterTables"], num_layers: int, num_modules: int) -> dict[str, np.ndarray]:
        """Columns j = 0.. of `tables[j]`: "targeted", "a_offsets", "b_offsets" `[num_modules, n]` and
        "ranks", "scalings" `[num_layers, num_modules, n]` (strided views of one array)."""
        m, lm = num_modules, num_layers * num_modules
        block = np.concatenate([t.column for t in tables]).reshape(len(tables), -1).T  # [entry, adapter]
        return {"targeted": block[:m], "a_offsets": block[m : 2 * m], "b_offsets": block[2 * m : 3 * m],
                "ranks": block[3 * m : 3 * m + lm].reshape(num_layers, m, -1),
                "scalings": block[3 * m + lm :].reshape(num_layers, m, -1).view(np.float32)}


@dataclass
class ResidentAdapter:
    name: str
    layout: RowLayout
    slot_ids: list[int]
    tables: AdapterTables  # its column of every step's LoRA tables: fixed while it is resident
    references: int = 0
    copied: torch.cuda.Event | None = None  # recorded on the copy stream after its rows were written


@dataclass
class ResidencyStats:
    loads: int = 0  # host -> pool copies
    evictions: int = 0
    hits: int = 0  # a request found its adapter already resident
    prefetches: int = 0  # loads made for a request still waiting (counted in `loads` too)


class AdapterResidency:
    def __init__(self, registry: AdapterRegistry, store: HostStore, pool: UnifiedPool):
        self.registry = registry
        self.store = store
        self.pool = pool
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # LRU order, oldest first
        self._layouts: dict[str, RowLayout] = {}
        self.stats = ResidencyStats()
        device = pool.layers[0].device
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._step_issued = torch.cuda.Event() if self._copy_stream is not None else None  # see `mark_step_issued`

    def slots_needed(self, name: str) -> int:
        """Free slots that admitting a request of this adapter costs (0 if it is resident)."""
        if name in self._resident:
            return 0
        layout = self._layouts.get(name)
        if layout is None:
            layout = self._layouts[name] = RowLayout.of(self.registry.get(name), self.registry.arch)
        return layout.num_slots

    def evictable_slots(self, keep: str | None = None) -> int:
        return sum(a.layout.num_slots for a in self._resident.values() if a.references == 0 and a.name != keep)

    def make_room(self, num_slots: int, keep: str | None = None) -> bool:
        """Evict idle adapters (LRU first) until `num_slots` are free; False if that cannot be done."""
        if self.pool.num_free + self.evictable_slots(keep) < num_slots:
            return False
        for adapter in list(self._resident.values()):
            if self.pool.num_free >= num_slots:
                break
            if adapter.references == 0 and adapter.name != keep:
                self._evict(adapter)
        return True

    def acquire(self, name: str) -> ResidentAdapter:
        """Make `name` resident (the caller made room) and take a reference for one request."""
        adapter = self._resident.get(name)
        if adapter is None:
            adapter = self._load(name)
        else:
            self.stats.hits += 1
            self._resident.move_to_end(name)
        if adapter.copied is not None:  # the step that uses it runs after its rows are in the pool
            torch.cuda.current_stream(self.pool.layers[0].device).wait_event(adapter.copied)
            adapter.copied = None
        adapter.references += 1
        return adapter

    def prefetch(self, name: str) -> None:
        """Load an adapter a waiting request will need, with no reference: it stays evictable."""
        if name not in self._resident:
            self._load(name, prefetch=True)
            self.stats.prefetches += 1

    def mark_step_issued(self) -> None:
        """Called right before a step's forward pass is issued: prefetches made after it wait only for
        the compute work issued before that step (see `_load`)."""
        if self._step_issued is not None:  # a wait_event takes the record made before it: one event serves
            self._step_issued.record(torch.cuda.current_stream(self.pool.layers[0].device))

    def release(self, name: str) -> None:
        self._resident[name].references -= 1

    def get(self, name: str) -> ResidentAdapter:
        return self._resident[name]

    def is_resident(self, name: str) -> bool:
        return name in self._resident

    def forget(self, name: str) -> None:
        """Drop every copy of a removed adapter; the caller checked that no request uses it."""
        adapter = self._resident.get(name)
        if adapter is not None:
            self._release_slots(adapter)
        self._layouts.pop(name, None)
        self.store.drop(name)

    def _load(self, name: str, prefetch: bool = False) -> ResidentAdapter:
        spec = self.registry.get(name)
        host = self.store.get(spec)
        slot_ids = self.pool.allocate(host.layout.num_slots, "adapter")
        device = self.pool.layers[0].device
        arch = self.registry.arch
        tables = AdapterTables.of(host.layout, spec.layer_ranks, spec.layer_scalings,
                                  slot_rows(slot_ids, host.layout.num_rows), arch.index, arch.num_layers)
        # The slots are free now, but steps overlap (engine.py): one still in flight may read or write
        # slots freed since it was issued (a request that finished or was preempted meanwhile). So the
        # copies wait for the compute work issued before the step now being issued (`mark_step_issued`),
        # which touches none of the free slots; a prefetch, made once that step is issued, overlaps it.
        stream = self._copy_stream
        if stream is not None:
            if prefetch:  # (an event never recorded makes no wait: no step has been issued)
                stream.wait_event(self._step_issued)
            else:
                stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            table = torch.from_numpy(tables.row_table.astype(np.int64))
            row_table = (table.pin_memory() if stream is not None else table).to(device, non_blocking=True)
            for layer in range(len(self.pool.layers)):
                self.pool.rows(layer)[row_table] = host.rows[layer].to(device, non_blocking=True)
        adapter = ResidentAdapter(name, host.layout, slot_ids, tables)
        if stream is not None:
            adapter.copied = torch.cuda.Event()
            adapter.copied.record(stream)
        self._resident[name] = adapter
        self.stats.loads += 1
        return adapter

    def _evict(self, adapter: ResidentAdapter) -> None:
        self._release_slots(adapter)
        self.stats.evictions += 1

    def _release_slots(self, adapter: ResidentAdapter) -> None:
        if adapter.copied is not None:  # never admitted: whatever gets its slots next waits for its copy
            torch.cuda.current_stream(self.pool.layers[0].device).wait_event(adapter.copied)
        del self._resident[adapter.name]
        self.pool.free(adapter.slot_ids, "adapter")

    def resident_names(self) -> list[str]:
        return list(self._resident)
