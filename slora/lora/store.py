"""The host store: adapters' weights in host memory in the pool's row layout, with a disk tier.

Loading an adapter into the pool is then one copy of ready rows. The store keeps at most
`max_adapters` packed copies (least recently used dropped first); a dropped adapter is read again
from its safetensors file (the disk tier), so the registry can hold far more adapters than host
memory. On a GPU host the copies are pinned, so that copies to the device are async.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from slora.architecture import ArchitectureSpec
from slora.lora.adapter import AdapterSpec, load_adapter_weights
from slora.lora.layout import RowLayout, pack_rows


@dataclass
class HostAdapter:
    spec: AdapterSpec
    layout: RowLayout
    rows: torch.Tensor  # [num_layers, num_rows, kv_dim], pool dtype


@dataclass
class StoreStats:
    disk_loads: int = 0
    host_evictions: int = 0


class HostStore:
    def __init__(self, arch: ArchitectureSpec, dtype: torch.dtype, pin_memory: bool, max_adapters: int | None = None):
        self.arch = arch
        self.dtype = dtype
        self.pin_memory = pin_memory
        self.max_adapters = max_adapters
        self._cache: OrderedDict[str, HostAdapter] = OrderedDict()
        self.stats = StoreStats()

    def get(self, spec: AdapterSpec) -> HostAdapter:
        cached = self._cache.get(spec.name)
        if cached is not None and cached.spec is spec:
            self._cache.move_to_end(spec.name)
            return cached
        layout = RowLayout.of(spec, self.arch)
        rows = pack_rows(load_adapter_weights(spec, self.arch), layout, self.arch).to(self.dtype)
        if self.pin_memory:
            rows = rows.pin_memory()
        adapter = HostAdapter(spec, layout, rows)
        self._cache[spec.name] = adapter
        self.stats.disk_loads += 1
        while self.max_adapters is not None and len(self._cache) > self.max_adapters:
            self._cache.popitem(last=False)
            self.stats.host_evictions += 1
        return adapter

    def drop(self, name: str) -> None:
        self._cache.pop(name, None)

    def __len__(self) -> int:
        return len(self._cache)
