"""Benchmark adapters: many distinct adapter names over a handful of weight files.

Thousands of Llama-2-7B adapters do not fit anywhere as distinct weights (rank 64 on q/k/v/o is
134 MB in fp16: 2,000 of them are 268 GB, more than a GPU host's RAM or disk). So the benchmark
writes `variants` random PEFT folders per rank (fp16 safetensors, deterministic from the seed) and
registers every adapter name against one of them: adapter `lora-i` gets rank `ranks[i % len(ranks)]`
and variant `(i // len(ranks)) % variants` (other names: i is a hash of the name). Each name is still a distinct adapter to the engine: it is
registered, made resident in the pool, evicted and loaded on its own, so the GPU side (pool slots,
host-to-device copies, LoRA math per distinct adapter) is exactly that of distinct weights.

Only the host side is shared: `SharedFileStore` (a `HostStore` installed into the engine by the
benchmark) packs each weight file's rows once and hands the same pinned host copy to every name
that points to that file, which is what "generated straight into the host store" means here. With
`--adapter-store engine` the engine's own store is used instead (each name packed on its own, up
to `--max-cpu-adapters`, the rest re-read from disk).
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slora.architecture import ArchitectureSpec
from slora.fixtures import write_adapter
from slora.lora.adapter import AdapterSpec, load_adapter_weights
from slora.lora.layout import RowLayout, pack_rows
from slora.lora.store import HostAdapter, HostStore

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class AdapterSet:
    """Adapter names, the PEFT folder each one points to, and its rank."""

    folders: dict[str, Path] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    targets: tuple[str, ...] = ATTENTION_TARGETS

    @property
    def names(self) -> list[str]:
        return list(self.folders)

    @property
    def distinct_files(self) -> int:
        return len(set(self.folders.values()))

    def describe(self) -> dict:
        return {"num_adapters": len(self.folders), "distinct_weight_files": self.distinct_files,
                "ranks": sorted(set(self.ranks.values())), "targets": list(self.targets)}


def prepare_adapter_set(names: list[str], arch: ArchitectureSpec, root: str | Path,
                        ranks: tuple[int, ...] = (8, 16, 32, 64),
                        targets: tuple[str, ...] = ATTENTION_TARGETS, variants: int = 4, seed: int = 0,
                        dtype: torch.dtype = torch.float16) -> AdapterSet:
    """Write (or reuse) `variants` folders per rank under `root` and point every name at one of them."""
    if not ranks:
        raise ValueError("at least one adapter rank is needed")
    unknown = [t for t in targets if t not in arch.index]
    if unknown:
        raise ValueError(f"unknown adapter targets {unknown}; choose from {', '.join(arch.module_names)}")
    root = Path(root)
    shapes = [(t.name, t.in_features, t.out_features) for t in arch.targets]
    shape_key = hashlib.sha256(json.dumps([arch.num_layers, shapes, list(targets), seed,
                                           str(dtype)], sort_keys=True).encode()).hexdigest()[:10]
    adapters = AdapterSet(targets=tuple(targets))
    written: dict[tuple[int, int], Path] = {}
    for name in names:
        i = adapter_number(name)
        rank, variant = ranks[i % len(ranks)], (i // len(ranks)) % max(1, variants)
        if (rank, variant) not in written:
            folder = root / f"{shape_key}-r{rank}-v{variant}"
            if not (folder / "adapter_config.json").is_file():
                # A ~ N(0, 1/in), B ~ N(0, 0.02^2): the delta stays small next to a dummy base output.
                write_adapter(folder, arch, rank, targets, seed * 1000 + rank * 10 + variant, a_scale=None,
                              b_scale=0.02, dtype=dtype)
            written[(rank, variant)] = folder
        adapters.folders[name] = written[(rank, variant)]
        adapters.ranks[name] = rank
    return adapters


def adapter_number(name: str) -> int:
    """`lora-00042` -> 42 (the synthetic workloads' names); any other name -> a stable hash, so that
    an adapter's rank and weights depend on its name only, not on which others are registered."""
    match = re.fullmatch(r"lora-(\d+)", name)
    return int(match.group(1)) if match else zlib.crc32(name.encode())


class SharedFileStore(HostStore):
    """A host store that packs each weight file once and shares the packed rows among the names
    that point to it (see the module docstring). Every name is still loaded into the pool alone."""

    def __init__(self, arch: ArchitectureSpec, dtype: torch.dtype, pin_memory: bool):
        super().__init__(arch, dtype, pin_memory, None)
        self._packed: dict[str, tuple[RowLayout, torch.Tensor]] = {}
        self._names: set[str] = set()

    @classmethod
    def replacing(cls, store: HostStore) -> "SharedFileStore":
        return cls(store.arch, store.dtype, store.pin_memory)

    def get(self, spec: AdapterSpec) -> HostAdapter:
        key = str(spec.weights_file)
        packed = self._packed.get(key)
        if packed is None:
            layout = RowLayout.of(spec, self.arch)
            rows = pack_rows(load_adapter_weights(spec, self.arch), layout, self.arch).to(self.dtype)
            if self.pin_memory:
                rows = rows.pin_memory()
            packed = self._packed[key] = (layout, rows)
            self.stats.disk_loads += 1
        self._names.add(spec.name)
        return HostAdapter(spec, packed[0], packed[1])

    def drop(self, name: str) -> None:
        self._names.discard(name)

    def __len__(self) -> int:
        return len(self._names)

