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

from .config import GEOMETRIES

# Entries of the vector `local_sums` returns (and the caller reduces).
NORMALISER, GRAD_SQ, DIRECTION_SQ = 0, 1, 2
NUM_SUMS = 3


def _check(geometry: str) -> None:
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r}; allowed: {', '.join(GEOMETRIES)}")


def _read(theta: Tensor, g: Tensor, inv_scale: float) -> tuple[Tensor, Tensor]:
    """theta and g as float32 (no copy when they already are); g read as g * inv_scale, which
    undoes a loss scale (exact for a power-of-two scale)."""
    g = g.float() * inv_scale if inv_scale != 1.0 else g.float()
    return theta.float(), g


def _t(theta: Tensor, eta: float) -> Tensor:
    """ASAM's T = |theta| + eta, a new tensor."""
    t = theta.abs()
    return t.add_(eta) if eta else t


def local_sums(geometry: str, thetas: Sequence[Tensor], grads: Sequence[Optional[Tensor]],
               eta: float, eta_f: float, inv_scale: float = 1.0) -> Tensor:
    """[N, sum g^2, sum u^2] over this rank's pieces, float64 on the first piece's device.

    Sums are float32 reductions over rows of _ROW entries, added in float64 (see _ROW), taken a
    block at a time (_blocks). Elementwise work is kept to what the sums need: asam is |theta|,
    T g and T^2 g in place, each squared sum taken once; for sam, N = sum g^2 = sum u^2. A piece
    whose grad is None (unused, or empty on this rank) adds 0.
    """
    _check(geometry)
    device = thetas[0].device if len(thetas) else torch.device("cpu")
    pieces = []
    for theta_piece, g_piece in zip(thetas, grads):
        if g_piece is None or g_piece.numel() == 0:
            continue
        for theta, g in _blocks(theta_piece, g_piece):
            theta, g = _read(theta, g, inv_scale)
            g_sq = _square_sum(g)
            if geometry == "sam":
                pieces.append(torch.stack((g_sq, g_sq, g_sq)))
            elif geometry == "asam":
                t = _t(theta, eta)
                tg = t * g
                n = _square_sum(tg)
                pieces.append(torch.stack((n, g_sq, _square_sum(tg.mul_(t)))))  # u = T^2 g
            else:
                g2 = g.square()
                f = g2.mul(eta_f).add_(1.0)  # f = 1 + eta_f g^2
                n = _sum(g2.div_(f))  # sum g^2 / f
                pieces.append(torch.stack((n, g_sq, _square_sum(g / f))))  # u = g / f
    if not pieces:
        return torch.zeros(NUM_SUMS, dtype=torch.float64, device=device)
    return torch.stack(pieces).sum(dim=0)


# Entries per block of the elementwise work (a multiple of _ROW, so that blocks split no row).
# Every temporary of local_sums and ascent is one block's size, not a piece's: on the CPU a block
# of 4 MB stays in cache and in the allocator's reused memory (a piece-sized temporary is a fresh
# mapping each time: measured on an 83M-entry shard, ASAM's sums and ascent with its restore copy
# took 2.2 s, 0.9 s of it in the kernel's page faults; by blocks 1.2 s); on a GPU blocks of 64 MB
# keep the launches few.
CPU_BLOCK, DEVICE_BLOCK = 1 << 20, 1 << 24


def _blocks(*tensors: Tensor):
    """Aligned blocks of tensors with the same number of entries: views, so writes reach them. A
    tensor that is not contiguous (no flat view) comes whole."""
    if not all(t.is_contiguous() for t in tensors):
        yield tensors
        return
    flat = [t.view(-1) for t in tensors]
    size = CPU_BLOCK if flat[0].device.type == "cpu" else DEVICE_BLOCK
    for start in range(0, flat[0].numel(), size):
        yield [f[start:start + size] for f in flat]


# Entries per float32 partial sum. One float32 reduction over a whole piece was off by 7e-4
# (relative) on 10M normal entries; rows of 4096 added in float64 are within 7e-8 on 30M, at the
# float32 speed (1.4 ms per 10M here, against 34 ms for a float64 reduction). Pieces smaller than
# a row are summed in float64 outright: a small model's sums stay as exact as before.
_ROW = 4096


def _rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x flattened as (whole rows of _ROW entries, the remainder)."""
    x = x.reshape(-1)
    whole = x.numel() - x.numel() % _ROW
    return x[:whole].view(-1, _ROW), x[whole:]


def _square_sum(x: Tensor) -> Tensor:
    """sum x^2 as a float64 scalar: float32 row norms squared and added in float64, the remainder
    (under _ROW entries) in float64."""
    rows, rest = _rows(x)
    return torch.linalg.vector_norm(rows, dim=1).double().square().sum() + rest.double().square().sum()


def _sum(x: Tensor) -> Tensor:
    """sum x as a float64 scalar: float32 row sums added in float64, the remainder in float64."""
    rows, rest = _rows(x)
    return rows.sum(dim=1).double().sum() + rest.double().sum()


def scale_factor(radius: float, normaliser: float, eps: float) -> float:
    """r / (sqrt(N) + eps): the scalar every direction is multiplied by."""
    return radius / (math.sqrt(max(normaliser, 0.0)) + eps)


def ascent(geometry: str, theta: Tensor, g: Optional[Tensor], factor: float, eta: float,
           eta_f: float, inv_scale: float = 1.0, out: Optional[Tensor] = None) -> Tensor:
    """theta + e for one local piece, e = factor * u (zero where g is None), written into ``out``
    (the same number of entries, any float dtype; it may be theta itself: each block is read
    before it is written) and returned; without ``out``, a new float32 tensor."""
    _check(geometry)
    if out is None:
        out = torch.empty(theta.shape, dtype=torch.float32, device=theta.device)
    if g is None or g.numel() == 0:
        return out.copy_(theta)
    for theta_block, g_block, out_block in _blocks(theta, g, out):
        th, gb = _read(theta_block, g_block, inv_scale)
        if geometry == "sam":
            value = torch.add(th, gb, alpha=factor)
        elif geometry == "asam":
            t = _t(th, eta)
            value = torch.addcmul(th, t.mul_(t), gb, value=factor)  # theta + factor T^2 g
        else:
            value = torch.addcdiv(th, gb, gb.square().mul_(eta_f).add_(1.0), value=factor)  # theta + factor g / f
        out_block.copy_(value)
    return out


def e_norm(radius: float, sums: Tensor, eps: float) -> float:
    """||e|| from the reduced sums: r * sqrt(sum u^2) / (sqrt(N) + eps)."""
    return scale_factor(radius, float(sums[NORMALISER]), eps) * math.sqrt(float(sums[DIRECTION_SQ]))
