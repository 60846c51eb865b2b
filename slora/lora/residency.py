"""Which adapters are in the unified pool, where, and which may leave.

An adapter becomes resident when a request that names it is admitted: it takes `layout.num_slots`
slots next to the KV cache and its host rows are copied into those slots in every layer. Running
requests hold a reference to their adapter, so it cannot be evicted under them; an adapter with no
reference stays resident (a later request hits it) until its slots are needed, then the least
recently used idle adapter goes first.

Adapters of requests still waiting can be loaded ahead (`prefetch`), while the GPU computes a step:
on CUDA every load is issued on a copy stream of its own and the compute stream waits for it only
when a request that uses the adapter is admitted (`acquire`).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from slora.lora.layout import RowLayout
from slora.lora.registry import AdapterRegistry
from slora.lora.store import HostStore
from slora.memory.pool import UnifiedPool


@dataclass
class ResidentAdapter:
    name: str
    layout: RowLayout
    slot_ids: list[int]
    row_table: torch.Tensor  # [num_rows] int64 on the device: canonical row -> pool row
    layer_ranks: dict[tuple[int, str], int]
    layer_scalings: dict[tuple[int, str], float]
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

    def slots_needed(self, name: str) -> int:
        """Free slots that admitting a request of this adapter costs (0 if it is resident)."""
        if name in self._resident:
            return 0
        layout = self._layouts.get(name)
        if layout is None:
            layout = self._layouts[name] = RowLayout.of(self.registry.get(name), self.registry.model)
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
            self._load(name)
            self.stats.prefetches += 1

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

    def _load(self, name: str) -> ResidentAdapter:
        spec = self.registry.get(name)
        host = self.store.get(spec)
        slot_ids = self.pool.allocate(host.layout.num_slots, "adapter")
        device = self.pool.layers[0].device
        slots = torch.tensor(slot_ids, dtype=torch.int64)
        # The slots are free, so no kernel in flight reads them; the engine synchronises every step,
        # so nothing the copy stream allocates is freed while the compute stream may still read it.
        stream = self._copy_stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            row_table = torch.stack((2 * slots, 2 * slots + 1), dim=1).flatten()[: host.layout.num_rows].to(device)
            for layer in range(len(self.pool.layers)):
                self.pool.rows(layer)[row_table] = host.rows[layer].to(device, non_blocking=True)
        adapter = ResidentAdapter(name, host.layout, slot_ids, row_table, spec.layer_ranks, spec.layer_scalings)
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
        del self._resident[adapter.name]
        self.pool.free(adapter.slot_ids, "adapter")

    def resident_names(self) -> list[str]:
        return list(self._resident)
