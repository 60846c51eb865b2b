"""The kernels an engine runs, chosen once at start-up as one backend object.

The model calls `backend.add_rms_norm` and `backend.attention`; the batch builder takes each step's
LoRA op from `backend.lora_op`, and the CUDA graphs take theirs from it too. Nothing compares backend
names after `select_backend`.

- `TorchBackend`: the torch reference kernels, on any device (the CPU's default);
- `TritonBackend`: the Triton kernels (CUDA's default; on the CPU under `TRITON_INTERPRET=1`).

Either runs the LoRA op that `lora_kernel` names: the Triton backend's kernels ("auto" = the
segment form, "segment", "token"), or on either backend S-LoRA's ablations in plain torch ("bmm",
"padded"); the torch backend's own is `TorchLoRA`. Steps can be captured as CUDA graphs only with a
Triton LoRA form (`graph_lora_form`): the ablations' shapes follow the batch.
"""

from __future__ import annotations

import torch

from slora.architecture import ArchitectureSpec
from slora.kernels import attention, fused
from slora.kernels.lora import LoRABatch, TorchLoRA
from slora.kernels.lora_ablations import PaddedBmmLoRA
from slora.kernels.metadata import ForwardBatch, LoRAOp

ABLATIONS = {"bmm": "token", "padded": "adapter"}  # lora_kernel -> PaddedBmmLoRA's gather
TRITON_FORMS = {"auto": "segment", "segment": "segment", "token": "token"}  # lora_kernel -> TritonLoRA's form


class TorchBackend:
    name = "torch"

    def __init__(self, lora_kernel: str = "auto"):
        if lora_kernel not in ABLATIONS and lora_kernel != "auto":
            raise ValueError(f"lora_kernel {lora_kernel!r} is a Triton kernel form; the torch backend runs "
                             "'auto', 'bmm' or 'padded'")
        self.lora_kernel = lora_kernel

    @property
    def graph_lora_form(self) -> str | None:
        """The Triton LoRA form that CUDA graphs of steps run; None: steps cannot be captured."""
        return None

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`(norm(r), r)` with `r = residual + x` (or `x` at the first layer)."""
        return fused.add_rms_norm(x, weight, eps, residual)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                  layer: int, batch: ForwardBatch) -> torch.Tensor:
        """Rotary on q and k, k and v written into their pool slots, then q's attention to each context."""
        q, k = fused.rotate(q, k, batch.positions, *rotary)
        return attention.paged_attention(q, k, v, batch.kv_cache[layer], batch.attention)

    def lora_op(self, kv_cache: list[torch.Tensor], lora: LoRABatch, **triton_config) -> LoRAOp:
        if self.lora_kernel in ABLATIONS:
            return PaddedBmmLoRA(kv_cache, lora, ABLATIONS[self.lora_kernel])
        return TorchLoRA(kv_cache, lora)

    def precompile(self, kv_layer: torch.Tensor, spec: ArchitectureSpec) -> None:
        """Compile, before serving, every kernel that steps can launch (nothing to compile here)."""


class TritonBackend(TorchBackend):
    name = "triton"

    def __init__(self, lora_kernel: str = "auto"):
        # Imported here, not at the top: the Triton modules read TRITON_INTERPRET when they are imported.
        from slora.kernels import triton_attention, triton_fused, triton_lora

        self._attention, self._fused, self._lora = triton_attention, triton_fused, triton_lora
        self.lora_kernel = lora_kernel

    @property
    def graph_lora_form(self) -> str | None:
        return TRITON_FORMS.get(self.lora_kernel)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fused.add_rms_norm(x, weight, eps, residual)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                  layer: int, batch: ForwardBatch) -> torch.Tensor:
        kv_layer = batch.kv_cache[layer]
        self._fused.rotate_and_write_kv(q, k, v, batch.positions, *rotary, kv_layer, batch.attention.slot_mapping)
        return self._attention.attend_pool(q, kv_layer, batch.attention)

    def lora_op(self, kv_cache: list[torch.Tensor], lora: LoRABatch, **triton_config) -> LoRAOp:
        """`triton_config`: `TritonLoRA`'s launch configuration (the CUDA graphs fix its token blocks)."""
        form = self.graph_lora_form
        if form is None:
            return super().lora_op(kv_cache, lora)
        return self._lora.TritonLoRA(kv_cache, lora, form=form, **triton_config)

    def precompile(self, kv_layer: torch.Tensor, spec: ArchitectureSpec) -> None:
        """On a GPU, compile every LoRA kernel variant that steps can launch: a compile inside a step
        stalls every request of the batch for a second or more (`triton_lora.precompile`)."""
        form = self.graph_lora_form
        if kv_layer.device.type == "cuda" and form is not None:
            self._lora.precompile(kv_layer, spec.projections.values(), len(spec.targets), form)


def select_backend(name: str | None, device: torch.device, lora_kernel: str = "auto") -> TorchBackend:
    """The backend `name` names (one of `config.BACKENDS`, checked by `EngineConfig`); None: Triton on
    CUDA and the torch reference elsewhere."""
    if name is None:
        name = "triton" if device.type == "cuda" else "torch"
    return TritonBackend(lora_kernel) if name == "triton" else TorchBackend(lora_kernel)
