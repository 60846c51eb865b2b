"""The naive multi-adapter server: one adapter merged into the base weights at a time.

The engine runs with no LoRA at all; before serving an adapter's requests its delta
`s * B @ A` is added to every targeted weight in place, and subtracted again before the next
adapter is merged. Requests of the merged adapter are batched together (continuous batching
within one adapter); when none of them is left running, the adapter of the oldest waiting
request is merged next (first come, first served between adapters). Base-model requests form
their own group with nothing merged. Swap time is part of the measured time.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch

from slora.bench.driver import Gate
from slora.bench.workload import BenchRequest
from slora.lora.adapter import load_adapter_weights, read_adapter

_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class MergedSwap(Gate):
    def __init__(self, engine, folders: dict[str, Path]):
        self.engine = engine
        self.folders = folders
        self.current: str | None = None
        self.swaps = 0
        self._deltas: dict[Path, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]] = {}

    def admit(self, arrived: deque[BenchRequest], engine_busy: bool) -> list[tuple[BenchRequest, str | None]]:
        if not arrived:
            return []
        if not engine_busy and not any(r.adapter == self.current for r in arrived):
            self._swap(arrived[0].adapter)
        admitted = [r for r in arrived if r.adapter == self.current]
        for r in admitted:
            arrived.remove(r)
        return [(r, None) for r in admitted]

    def _swap(self, adapter: str | None) -> None:
        if self.current is not None:
            self._apply(self.current, -1.0)
        if adapter is not None:
            self._apply(adapter, 1.0)
        self.current = adapter
        self.swaps += 1

    def restore(self) -> None:
        """Unmerge whatever is merged, leaving the base weights as they were (up to rounding)."""
        if self.current is not None:
            self._apply(self.current, -1.0)
            self.current = None

    @torch.no_grad()
    def _apply(self, adapter: str, sign: float) -> None:
        for weight, a, b, scaling in self._factors(adapter):
            weight.add_((b @ a).to(weight.dtype), alpha=sign * scaling)

    def _factors(self, adapter: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
        folder = self.folders[adapter]
        if folder not in self._deltas:
            config, arch = self.engine.model_config, self.engine.arch
            spec = read_adapter(adapter, folder, arch)
            weights = load_adapter_weights(spec, arch)
            device, dtype = self.engine.device, self.engine.dtype
            self._deltas[folder] = [
                (target_weight(self.engine.model, layer, module, config),
                 w.A.to(device, dtype), w.B.to(device, dtype), w.scaling)
                for (layer, module), w in weights.items()
            ]
        return self._deltas[folder]


def target_weight(model: torch.nn.Module, layer: int, module: str, config) -> torch.Tensor:
    """The `[out, in]` weight of `module` in decoder layer `layer`: a view into a fused projection
    (`qkv_proj`, `gate_up_proj`) when the model fuses them."""
    block = model.model.layers[layer]
    for part in (block.self_attn, block.mlp):
        linear = getattr(part, module, None)
        if linear is not None:
            return linear.weight.data
    fused_name, index = _FUSED.get(module, (None, 0))
    for part in (block.self_attn, block.mlp):
        fused = getattr(part, fused_name, None) if fused_name else None
        if fused is not None:
            sizes = ([config.q_dim, config.kv_dim, config.kv_dim] if fused_name == "qkv_proj"
                     else [config.intermediate_size] * 2)
            start = sum(sizes[:index])
            return fused.weight.data[start : start + sizes[index]]
    raise ValueError(f"merged-swap cannot find the weight of {module} in layer {layer} of this model")
