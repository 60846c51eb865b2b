"""The small ops of a decoder layer in plain torch: the references of `triton_fused.py`.

- `add_rms_norm`: the residual add and RMSNorm (float32 inside, rounded to the model's dtype);
- `rotate`: rotary embedding of q and k at each token's position (Llama's half-split layout).
"""

from __future__ import annotations

import torch


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(norm(r) * weight, r)` with `r = residual + x`, or `r = x` without a residual."""
    residual = x if residual is None else residual + x
    x32 = residual.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(residual.dtype)
    return weight * normed, residual


def rotate(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D] and k [T, KVH, D] rotated by the angles of each token's position (`cos`, `sin`:
    [max_positions, D/2] float32)."""
    cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
