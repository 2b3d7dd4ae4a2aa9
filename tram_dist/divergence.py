"""The trust-region divergence: local KL sums and counts, chunk by chunk, and the radius.

At an LLM's shape the logits, not the weights, decide whether a step fits: a [B, T, V] tensor
at V = 152k is a gigabyte per few thousand tokens. The KL is therefore taken a chunk of
positions at a time, each chunk in float64 (its own temporaries: three chunk-sized buffers),
so the divergence never holds more than one chunk of full-vocabulary temporaries, whatever B
and T are. (tram_dist.head goes further: it makes the target's logits through the LM head a block
of positions at a time, so that they never exist whole either.)

Why float64 per chunk: TRAM's KLs are small (near-identical distributions), and in float32 the
difference log p_t - log p_c loses about 1e-6 absolutely per position at V = 152k (log p is
near -12, whose float32 spacing is 9.5e-7), which is a relative error of 1e-4 on a KL of 1e-2.
In float64 the chunked sum matches an unchunked float64 one to rounding (tests/test_llm_memory.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import KL_CHUNK

# On the CPU a chunk of at most CPU_CHUNK entries (one position at V = 152k) is faster than a
# larger one: its float64 temporaries (2 MB each) stay in cache and in the allocator's reused
# memory, where 16 MB ones are mapped afresh for every chunk (measured on 512 x 151,936 fp32
# logits, one thread: 0.64-0.74 s at 2^17-2^19 entries against 0.93-1.5 s at the default 2^21).
# On a GPU the configured chunk stands: there a chunk costs a few kernel launches.
CPU_CHUNK = 1 << 18


def as_rows(x: Tensor) -> Tensor:
    """Logits [..., V] as [rows, positions, V] without a copy for the usual layouts: [P, V] is one
    row of P positions (classification: P examples); [B, T, V] is B rows of T positions."""
    if x.dim() < 2:
        raise ValueError(f"logits must be [..., C] with at least one leading dimension, got shape {tuple(x.shape)}")
    return x.unsqueeze(0) if x.dim() == 2 else x.flatten(0, -3)


def kl_rows(current: Tensor, target: Tensor, direction: str) -> Tensor:
    """KL of each position of [n, V] logits, in float64 (see the module docstring).

    forward:   KL(p_target || p_current) = sum_c p_t (log p_t - log p_c)
    reverse:   KL(p_current || p_target)
    symmetric: (forward + reverse) / 2 = sum_c (p_t - p_c)(log p_t - log p_c) / 2
    """
    lp_c = F.log_softmax(current.double(), dim=-1)
    lp_t = F.log_softmax(target.double(), dim=-1)
    if direction == "forward":
        diff = lp_t - lp_c
        return diff.mul_(lp_t.exp_()).sum(-1)
    if direction == "reverse":
        diff = lp_c - lp_t
        return diff.mul_(lp_c.exp_()).sum(-1)
    if direction == "symmetric":
        diff = lp_t - lp_c
        return diff.mul_(lp_t.exp_().sub_(lp_c.exp_())).sum(-1).mul_(0.5)
    raise ValueError(f"unknown divergence {direction!r}; allowed: forward, reverse, symmetric")


@torch.no_grad()
def kl_sum_count(current: Tensor, target: Tensor, direction: str = "forward",
                 mask: Optional[Tensor] = None, chunk: int = KL_CHUNK) -> tuple[Tensor, Tensor]:
    """Sum over predictions of the KL between softmax(target) and softmax(current), and their count.

    Logits are [..., C]; every leading position is one prediction (an example for
    classification, a token for language modelling). ``mask`` (shaped like the leading dims) drops
    positions whose label is ignored or whose attention mask is 0; they are computed and then
    left out, so no host read is needed to find them. Each chunk covers at most
    max(1, chunk // C) positions of one row (on the CPU, chunk is at most CPU_CHUNK). Returns
    float64 scalars on the logits' device: nothing is read back to the host.
    """
    if current.shape != target.shape:
        raise ValueError(f"current logits {tuple(current.shape)} and target logits {tuple(target.shape)} differ")
    cur, tgt = as_rows(current.detach()), as_rows(target.detach())
    rows, positions, vocab = cur.shape
    m = None
    if mask is not None:
        if mask.shape != current.shape[:-1]:
            raise ValueError(f"mask {tuple(mask.shape)} must match the prediction shape {tuple(current.shape[:-1])}")
        m = mask.to(device=cur.device, dtype=torch.bool).reshape(rows, positions)
    if cur.device.type == "cpu":
        chunk = min(chunk, CPU_CHUNK)
    step = max(1, chunk // vocab)
    total = torch.zeros((), dtype=torch.float64, device=cur.device)
    for b in range(rows):
        for start in range(0, positions, step):
            stop = min(positions, start + step)
            kl = kl_rows(cur[b, start:stop], tgt[b, start:stop], direction)
            if m is not None:
                kl = torch.where(m[b, start:stop], kl, 0.0)
            total += kl.sum()
    if m is None:
        # torch.full, not torch.tensor: on a GPU the latter copies from the host and waits for the stream
        count = torch.full((), float(rows * positions), dtype=torch.float64, device=cur.device)
    else:
        count = m.sum(dtype=torch.float64)
    return total, count


def radius(kl_sum: float, count: float, scale: float, rho_max: Optional[float]) -> float:
    """d_t = scale * (global KL sum / global count), clamped at rho_max; 0 when nothing was counted."""
    d = scale * kl_sum / count if count > 0 else 0.0
    return min(d, rho_max) if rho_max is not None else d
