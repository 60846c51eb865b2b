"""The systems a benchmark compares, and how each one's engine is built.

- `slora`: the engine as it is (unified pool, batched LoRA kernels).
- `base-only`: the same engine and requests with no adapter: the upper bound.
- `slora-split-pool`: S-LoRA's "no-unify-mem" ablation: a fixed share of the pool's slots is
  reserved for adapters and the KV cache may use only the rest, so neither can borrow from the
  other. Emulated here without touching the engine: the engine's pool and residency objects are
  switched to `SplitPool` / `SplitResidency` (subclasses) right after the engine is built.
- `slora-bmm`, `slora-padded`: S-LoRA's kernel ablations, the engine with `EngineConfig.lora_kernel`
  "bmm" (each token's adapter rows gathered from the pool, padded to the largest rank, at every op,
  then `torch.bmm`) or "padded" (each adapter's rows gathered once per op, padded, then `torch.bmm`):
  `kernels/lora_ablations.py`. They run without CUDA graphs (their shapes follow the batch).
- `peft` and `merged-swap` are not slora engines: see `peft_baseline.py` and `merged_swap.py`.
"""

from __future__ import annotations

from slora.lora.residency import AdapterResidency, ResidentAdapter
from slora.memory.pool import PoolExhausted, PoolStats, UnifiedPool

ENGINE_SYSTEMS = ("slora", "base-only", "slora-split-pool", "slora-bmm", "slora-padded")
LORA_KERNEL_VARIANTS = {"slora-bmm": "bmm", "slora-padded": "padded"}


class NotAvailable(RuntimeError):
    """A system this build cannot run; the message says why."""


def engine_config_overrides(system: str) -> dict:
    """Extra `EngineConfig` fields for `system`."""
    variant = LORA_KERNEL_VARIANTS.get(system)
    return {} if variant is None else {"lora_kernel": variant}


# --- the split pool (S-LoRA's no-unify-mem ablation) ------------------------------------------------

class SplitPool(UnifiedPool):
    """A unified pool whose last `region_slots` slots only adapters may take.

    `num_free` (what the scheduler checks for KV) counts the KV part only; adapters allocate from
    their region, which `SplitResidency` keeps within bounds by evicting idle adapters.
    """

    _region_free: list[int]
    region_slots: int

    @classmethod
    def convert(cls, pool: UnifiedPool, region_slots: int) -> "SplitPool":
        if pool.stats().used_slots:
            raise ValueError("a pool can only be split while it is empty")
        if not 0 < region_slots < pool.num_slots:
            raise ValueError(f"the adapter region must be between 1 and {pool.num_slots - 1} slots, got {region_slots}")
        pool.__class__ = cls
        pool.region_slots = region_slots
        kv_slots = pool.num_slots - region_slots
        pool._free = list(range(kv_slots - 1, -1, -1))
        pool._region_free = list(range(pool.num_slots - 1, kv_slots - 1, -1))
        return pool

    @property
    def region_free(self) -> int:
        return len(self._region_free)

    def allocate(self, n: int, owner: str) -> list[int]:
        if owner != "adapter":
            return super().allocate(n, owner)
        if n > len(self._region_free):
            raise PoolExhausted(f"asked for {n} adapter slots, {len(self._region_free)} free of {self.region_slots}")
        slot_ids = self._region_free[-n:] if n else []
        del self._region_free[len(self._region_free) - n:]
        self._used["adapter"] += n
        return slot_ids[::-1]

    def free(self, slot_ids: list[int], owner: str) -> None:
        if owner != "adapter":
            return super().free(slot_ids, owner)
        self._region_free.extend(slot_ids)
        self._used["adapter"] -= len(slot_ids)

    def stats(self) -> PoolStats:
        return PoolStats(self.num_slots, len(self._free) + len(self._region_free), self._used["kv"],
                         self._used["adapter"])


class SplitResidency(AdapterResidency):
    """Adapter residency inside a `SplitPool`'s fixed region.

    Adapters cost the KV part nothing, so `slots_needed` is 0 when the region can take the adapter
    (after evicting idle ones) and "more than the pool" when it cannot, which makes the scheduler
    wait; evicting adapters never frees KV slots, so `make_room` only reports. While the benchmark
    validates a new request (`validating`), the adapter's true size is reported instead, so that an
    adapter larger than the whole region is refused up front.
    """

    pool: SplitPool
    validating: bool = False

    @classmethod
    def convert(cls, residency: AdapterResidency) -> "SplitResidency":
        residency.__class__ = cls
        residency.validating = False
        return residency

    def slots_needed(self, name: str) -> int:
        need = super().slots_needed(name)
        if need == 0:
            return 0
        if self.validating:
            return need if need <= self.pool.region_slots else self.pool.num_slots
        if self.pool.region_free + self._idle_region_slots() >= need:
            return 0
        return self.pool.num_slots + 1

    def make_room(self, num_slots: int, keep: str | None = None) -> bool:
        return self.pool.num_free >= num_slots

    def _idle_region_slots(self) -> int:
        return sum(a.layout.num_slots for a in self._resident.values() if a.references == 0)

    def _load(self, name: str) -> ResidentAdapter:
        need = super().slots_needed(name)
        for adapter in list(self._resident.values()):
            if self.pool.region_free >= need:
                break
            if adapter.references == 0:
                self._evict(adapter)
        return super()._load(name)


def split_engine_pool(engine, adapter_share: float) -> int:
    """Turn a fresh engine's unified pool into a split one; returns the adapter region's slots."""
    if not 0.0 < adapter_share < 1.0:
        raise ValueError(f"the adapter share of a split pool must be in (0, 1), got {adapter_share}")
    region = max(1, int(engine.pool.num_slots * adapter_share))
    SplitPool.convert(engine.pool, region)
    SplitResidency.convert(engine.residency)
    return region
