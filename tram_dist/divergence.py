"""The trust-region divergence: local KL sums and counts, and the radius from reduced ones."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def kl_sum_count(current: Tensor, target: Tensor, direction: str = "forward",
                 mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Sum over predictions of KL between softmax(target) and softmax(current), and their count.

    forward:   KL(p_target || p_current) = sum_c p_t (log p_t - log p_c)
    reverse:   KL(p_current || p_target)
    symmetric: (forward + reverse) / 2
    Logits are [..., C]; every leading position is one prediction (an example for
    classification, a token for language modelling). ``mask`` (shaped like the leading dims)
    drops positions whose label is ignored or whose attention mask is 0. Computed in float32;
    returns float64 scalars so the cross-rank sum is exact at fp32 tolerance.
    """
    if current.shape != target.shape:
        raise ValueError(f"current logits {tuple(current.shape)} and target logits {tuple(target.shape)} differ")
    lp_c = F.log_softmax(current.detach().float(), dim=-1)
    lp_t = F.log_softmax(target.detach().float(), dim=-1)
    fwd = lambda: (lp_t.exp() * (lp_t - lp_c)).sum(-1)
    rev = lambda: (lp_c.exp() * (lp_c - lp_t)).sum(-1)
    if direction == "forward":
        kl = fwd()
    elif direction == "reverse":
        kl = rev()
    elif direction == "symmetric":
        kl = 0.5 * (fwd() + rev())
    else:
        raise ValueError(f"unknown divergence {direction!r}; allowed: forward, reverse, symmetric")
    if mask is None:
        return kl.sum(dtype=torch.float64), torch.tensor(float(kl.numel()), dtype=torch.float64, device=kl.device)
    mask = mask.to(device=kl.device, dtype=torch.bool)
    if mask.shape != kl.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match the prediction shape {tuple(kl.shape)}")
    return kl[mask].sum(dtype=torch.float64), mask.sum().to(torch.float64)


def radius(kl_sum: float, count: float, scale: float, rho_max: Optional[float]) -> float:
    """d_t = scale * (global KL sum / global count), clamped at rho_max; 0 when nothing was counted."""
    d = scale * kl_sum / count if count > 0 else 0.0
    return min(d, rho_max) if rho_max is not None else d
