"""The ascent step e of each geometry, on local tensors plus already-reduced scalars.

Every geometry writes e in one form,

    e = r * u / (sqrt(N) + eps),

with a direction u and a normaliser N that is a global sum over every trainable entry:

| geometry | u        | N              | T, f                       |
|----------|----------|----------------|----------------------------|
| sam      | g        | sum g^2        |                            |
| asam     | T^2 g    | sum (T g)^2    | T = abs(theta) + eta       |
| fisher   | g / f    | sum g^2 / f    | f = 1 + eta_f g^2          |

r is the radius (rho, gamma, or TRAM's divergence d_t). The local partial sums come from
`local_sums`; the caller reduces them across ranks (one all-reduce) and hands the global values to
`ascent`. Nothing here knows about ranks or shards. Everything is computed in float32.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

# Entries of the vector `local_sums` returns (and the caller reduces).
NORMALISER, GRAD_SQ, DIRECTION_SQ = 0, 1, 2
NUM_SUMS = 3


def direction(geometry: str, theta: Tensor, g: Tensor, eta: float, eta_f: float,
              inv_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """u and the per-entry terms of N for one local piece (both float32, shaped like g).

    inv_scale undoes a loss scale: g is read as g * inv_scale (exact for a power-of-two scale)."""
    g = g.float() * inv_scale if inv_scale != 1.0 else g.float()
    if geometry == "sam":
        return g, g * g
    if geometry == "asam":
        t = theta.float().abs().add_(eta)
        tg = t * g
        return t * tg, tg * tg
    if geometry == "fisher":
        g2 = g * g
        f = g2.mul(eta_f).add_(1.0)
        return g / f, g2 / f
    raise ValueError(f"unknown geometry {geometry!r}; allowed: sam, asam, fisher")


def local_sums(geometry: str, thetas: Sequence[Tensor], grads: Sequence[Optional[Tensor]],
               eta: float, eta_f: float, inv_scale: float = 1.0) -> Tensor:
    """[N, sum g^2, sum u^2] over this rank's pieces, float64 on the first piece's device.

    Each piece's sums are taken in float64 (exact enough that the reduction order across ranks
    does not show at fp32 tolerance) without a float64 copy of the piece, and each square is
    computed once: for sam, N = sum g^2 = sum u^2. A piece whose grad is None (unused, or empty
    on this rank) adds 0.
    """
    device = thetas[0].device if len(thetas) else torch.device("cpu")
    sums = torch.zeros(NUM_SUMS, dtype=torch.float64, device=device)
    for theta, g in zip(thetas, grads):
        if g is None or g.numel() == 0:
            continue
        g = g.float() * inv_scale if inv_scale != 1.0 else g.float()
        g_sq = _square_sum(g)
        if geometry == "sam":
            piece = (g_sq, g_sq, g_sq)
        elif geometry == "asam":
            tg = theta.float().abs().add_(eta).mul_(g)  # T g
            n = _square_sum(tg)
            piece = (n, g_sq, _square_sum(tg.mul_(theta.float().abs().add_(eta))))  # u = T^2 g
        else:
            u, n = direction(geometry, theta, g, eta, eta_f)
            piece = (n.sum(dtype=torch.float64), g_sq, _square_sum(u))
        sums += torch.stack(piece)
    return sums


def _square_sum(x: Tensor) -> Tensor:
    """sum x^2 accumulated in float64, with no float64 copy of x."""
    return torch.linalg.vector_norm(x, dtype=torch.float64).square()


def scale_factor(radius: float, normaliser: float, eps: float) -> float:
    """r / (sqrt(N) + eps): the scalar every direction is multiplied by."""
    return radius / (math.sqrt(max(normaliser, 0.0)) + eps)


def ascent(geometry: str, theta: Tensor, g: Optional[Tensor], factor: float, eta: float,
           eta_f: float, inv_scale: float = 1.0) -> Tensor:
    """theta + e for one local piece, float32; e = factor * u (zero where g is None)."""
    if g is None or g.numel() == 0:
        return theta.float().clone()
    u, _ = direction(geometry, theta, g, eta, eta_f, inv_scale)
    return u.mul_(factor).add_(theta.float())


def e_norm(radius: float, sums: Tensor, eps: float) -> float:
    """||e|| from the reduced sums: r * sqrt(sum u^2) / (sqrt(N) + eps)."""
    return scale_factor(radius, float(sums[NORMALISER]), eps) * math.sqrt(float(sums[DIRECTION_SQ]))
