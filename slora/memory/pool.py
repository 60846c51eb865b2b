"""The unified pool (S-LoRA's Unified Paging): one preallocated tensor per layer for KV and adapters.

`pool.layers[l]` has shape `[num_slots, 2, kv_heads, head_dim]`. A slot is one page: one token's
K (`[s, 0]`) and V (`[s, 1]`), and the same slot id means the same place in every layer, so one
allocation serves the whole model. Adapter weights take the same slots, seen as rows of `kv_dim`
elements (`rows(l)`), so KV and adapters share memory with no fixed split.

The allocator is a free list: `allocate(n)` and `free(ids)` are O(1) per slot, and every slot is
owned by exactly one user (a sequence's KV or a resident adapter), tracked by kind for the stats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from slora.config import ModelConfig, PoolConfig

SlotOwner = Literal["kv", "adapter"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class PoolExhausted(RuntimeError):
    """Raised when more slots are asked for than are free; callers check `num_free` first."""


def parse_memory(value: int | float | str) -> int | float:
    """'2GiB' -> bytes; 0.8 -> a fraction of free memory (kept as float); 1073741824 -> bytes."""
    if isinstance(value, (int, float)):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"pool memory {value!r} is not a size such as '2GiB', '500MB' or a fraction such as 0.8")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit == "" and number <= 1.0 and "." in match.group(1):
        return number
    return int(number * _UNITS[unit])


@dataclass
class PoolStats:
    num_slots: int
    free_slots: int
    kv_slots: int
    adapter_slots: int

    @property
    def used_slots(self) -> int:
        return self.kv_slots + self.adapter_slots


class UnifiedPool:
    """Per-layer slot tensors plus the free-list allocator shared by KV cache and adapters."""

    def __init__(self, model: ModelConfig, num_slots: int, dtype: torch.dtype, device: torch.device | str):
        if num_slots < 1:
            raise ValueError(f"the pool needs at least one slot, got num_slots={num_slots}")
        self.num_slots = num_slots
        self.kv_dim = model.kv_dim
        # One slot past the allocator's range, never handed out: where writes that belong to no
        # request land (the padding rows of a captured decode step).
        self.scratch_slot = num_slots
        self.layers = [
            torch.zeros(num_slots + 1, 2, model.num_kv_heads, model.head_dim, dtype=dtype, device=device)
            for _ in range(model.num_layers)
        ]
        # Pop from the end: low slot ids are handed out first, which keeps tests readable.
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._used = {"kv": 0, "adapter": 0}

    @staticmethod
    def bytes_per_slot(model: ModelConfig, dtype: torch.dtype) -> int:
        return model.num_layers * 2 * model.kv_dim * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def create(
        cls, model: ModelConfig, config: PoolConfig, dtype: torch.dtype, device: torch.device | str
    ) -> "UnifiedPool":
        """Size the pool from `config`: an exact slot count, bytes, or a fraction of free memory."""
        if config.num_slots is not None:
            return cls(model, config.num_slots, dtype, device)
        memory = parse_memory(config.memory if config.memory is not None else default_pool_memory(device))
        if isinstance(memory, float):
            if not 0.0 < memory <= 1.0:
                raise ValueError(f"pool memory fraction must be in (0, 1], got {memory}")
            memory = int(memory * free_device_memory(device))
        return cls(model, max(1, memory // cls.bytes_per_slot(model, dtype)), dtype, device)

    # --- allocator -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int, owner: SlotOwner) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(f"asked for {n} slots, {len(self._free)} free of {self.num_slots}")
        if n == 0:
            return []
        slot_ids = self._free[-n:]
        del self._free[-n:]
        self._used[owner] += n
        return slot_ids[::-1]

    def free(self, slot_ids: list[int], owner: SlotOwner) -> None:
        self._free.extend(slot_ids)
        self._used[owner] -= len(slot_ids)

    def stats(self) -> PoolStats:
        return PoolStats(self.num_slots, len(self._free), self._used["kv"], self._used["adapter"])

    # --- views -----------------------------------------------------------------------------------
    def rows(self, layer: int) -> torch.Tensor:
        """Layer `layer` seen as rows of `kv_dim` elements (row 2s = K, 2s+1 = V; the scratch slot's last)."""
        return self.layers[layer].view(-1, self.kv_dim)


def default_pool_memory(device: torch.device | str) -> int | float:
    """Most of the GPU's free memory; a modest fixed budget on the CPU, where memory is shared."""
    return 0.9 if torch.device(device).type == "cuda" else 2**30


def free_device_memory(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    import psutil

    return psutil.virtual_memory().available
