"""What a model family exposes to LoRA and to tensor parallelism: its architecture spec.

Each model family declares its spec as a function of its `ModelConfig` (`models/llama.py::llama_spec`),
and the loader's registry maps a `config.json`'s architecture to the family. Everything that names a
LoRA-targetable weight reads it from the spec, never from a list of its own: adapter validation
(PEFT's module paths and shapes), the adapters' row layout in the pool, the module axis of every
LoRA table, the projections that the model runs as one GEMM (and the LoRA kernels are compiled for),
and how each weight is split across tensor-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from slora.config import ModelConfig

# How a weight `[out, in]` is split across tensor-parallel ranks: "column" splits its output features
# (each rank computes a slice of y), "row" its input features (each rank's partial y is summed).
TPSplit = Literal["column", "row"]


@dataclass(frozen=True)
class TargetModule:
    """One LoRA-targetable linear of a decoder layer."""

    name: str  # PEFT's name for it, the last part of its module path: "q_proj"
    block: str  # the decoder layer's sub-module that holds it: "self_attn"
    in_features: int
    out_features: int
    tp_split: TPSplit


@dataclass(frozen=True)
class Projection:
    """LoRA-targetable linears of one input run as one GEMM (q/k/v, gate/up, or one alone): module
    `modules[i]` (the spec's target `targets[i]`) is columns `[starts[i], starts[i] + widths[i])` of the
    GEMM's output."""

    name: str
    modules: tuple[str, ...]
    targets: tuple[int, ...]  # each module's index in the spec's targets: the module axis of LoRA tables
    widths: tuple[int, ...]
    in_features: int

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(int(s) for s in np.cumsum((0,) + self.widths[:-1]))

    def columns(self, y) -> list[tuple[int, object]]:
        """(target index, that module's output as a view of `y`) for each module."""
        return [(t, y[:, s : s + w]) for t, s, w in zip(self.targets, self.starts, self.widths)]


@dataclass(frozen=True)
class ArchitectureSpec:
    """A model family's LoRA-targetable weights and the GEMMs that run them, for one model's shapes."""

    family: str
    config: ModelConfig
    targets: tuple[TargetModule, ...]  # in canonical order: the module axis of every LoRA table
    projection_modules: tuple[tuple[str, tuple[str, ...]], ...]  # (GEMM name, the targets it runs together)
    layer_prefix: str = "model.layers"  # where decoder layer i is, as PEFT names it: "model.layers.i"
    projections: dict[str, Projection] = field(init=False, repr=False, compare=False)
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {target.name: i for i, target in enumerate(self.targets)}
        projections = {}
        for name, modules in self.projection_modules:
            inputs = {self.targets[index[m]].in_features for m in modules}
            if len(inputs) != 1:
                raise ValueError(f"{self.family}: the modules of projection {name} take different inputs")
            projections[name] = Projection(name, modules, tuple(index[m] for m in modules),
                                           tuple(self.targets[index[m]].out_features for m in modules), inputs.pop())
        covered = sorted(m for _, modules in self.projection_modules for m in modules)
        if covered != sorted(index):
            raise ValueError(f"{self.family}: projections {covered} must cover every target {sorted(index)} once")
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "projections", projections)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(target.name for target in self.targets)

    def target(self, name: str) -> TargetModule:
        return self.targets[self.index[name]]

    def module_path(self, layer: int, module: str) -> str:
        """The full name of a targetable linear, as PEFT matches it: `model.layers.3.self_attn.q_proj`."""
        return f"{self.layer_prefix}.{layer}.{self.target(module).block}.{module}"

    def shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a target."""
        target = self.target(module)
        return target.in_features, target.out_features
