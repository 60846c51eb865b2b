"""The physical limit of a decode step: bytes it must read over the device's copy bandwidth.

A decode step reads every base weight once (except the embedding table, of which it reads one row
per token), the K/V of every sequence's context, and each distinct adapter of the batch once
(all its pool rows, in every layer). The floor of the step's time is those bytes over the measured
copy bandwidth (read + write bytes of a large device-to-device copy, over its time). The fraction
`floor / measured step time` says how close the engine is to the limit (1.0 = at it).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from slora.bench.metrics import StepRecord


@dataclass
class DecodeRoofline:
    copy_bandwidth: float  # bytes/s, read + write
    weight_bytes: int  # a decode step's share of the base weights
    kv_bytes_per_token: int  # K and V of one token, all layers
    adapter_bytes_per_row: int  # one pool row, all layers

    def step_bytes(self, step: StepRecord) -> int:
        return (self.weight_bytes + step.context_tokens * self.kv_bytes_per_token
                + step.adapter_rows * self.adapter_bytes_per_row)

    def floor_s(self, step: StepRecord) -> float:
        return self.step_bytes(step) / self.copy_bandwidth

    def summarise(self, steps: list[StepRecord]) -> dict:
        """The decode steps of a run against their floor: median, and at the run's largest batch."""
        decode = [s for s in steps if s.is_decode]
        if not decode:
            return {"decode_steps": 0, "bandwidth_fraction": None}
        fractions = np.array([self.floor_s(s) / s.duration for s in decode])
        largest = max(s.num_seqs for s in decode)
        at_largest = [s for s in decode if s.num_seqs == largest]
        mid = at_largest[len(at_largest) // 2]
        return {
            "decode_steps": len(decode),
            "bandwidth_fraction": float(np.median(fractions)),
            "largest_batch": largest,
            "bandwidth_fraction_at_largest_batch": float(np.median(
                [self.floor_s(s) / s.duration for s in at_largest])),
            "step_ms_at_largest_batch": float(np.median([s.duration for s in at_largest]) * 1e3),
            "floor_ms_at_largest_batch": float(np.median([self.floor_s(s) for s in at_largest]) * 1e3),
            "bytes_at_largest_batch": {
                "weights": self.weight_bytes,
                "kv": mid.context_tokens * self.kv_bytes_per_token,
                "adapters": mid.adapter_rows * self.adapter_bytes_per_row,
                "distinct_adapters": mid.distinct_adapters,
            },
        }

    def describe(self) -> dict:
        return asdict(self)


def decode_roofline(model: torch.nn.Module, kv_dim: int, num_layers: int, dtype: torch.dtype,
                    copy_bandwidth: float) -> DecodeRoofline:
    element = torch.empty((), dtype=dtype).element_size()
    seen, total = set(), 0
    for name, param in model.named_parameters():
        if id(param) in seen:  # tied embeddings: one tensor
            continue
        seen.add(id(param))
        if "embed_tokens" not in name or _is_tied(model):
            total += param.numel() * param.element_size()
    return DecodeRoofline(copy_bandwidth, total, num_layers * 2 * kv_dim * element, num_layers * kv_dim * element)


def _is_tied(model: torch.nn.Module) -> bool:
    lm_head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    return lm_head is not None and embed is not None and lm_head.weight is embed.weight


def measure_copy_bandwidth(device: torch.device | str, nbytes: int | None = None, iterations: int = 10) -> float:
    """Read + write bytes per second of a large device-to-device copy (1 GiB on GPU, 64 MiB on CPU)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    nbytes = nbytes or (2**30 if cuda else 2**26)
    source = torch.empty(nbytes // 2, dtype=torch.float16, device=device).fill_(1.0)
    target = torch.empty_like(source)
    target.copy_(source)
    if cuda:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            target.copy_(source)
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
    else:
        begin = time.perf_counter()
        for _ in range(iterations):
            target.copy_(source)
        seconds = time.perf_counter() - begin
    del source, target
    return 2 * (nbytes // 2) * 2 * iterations / seconds
