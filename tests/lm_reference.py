"""The single-process reference of tests/test_peft.py and tests/test_lm_trainers.py, written from
the rules (docs/how-it-works.md), not with tram_dist: SAM geometry, a "previous" target (or a
fixed radius), the base optimizer stepping with the gradient at theta + e."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def weights_at(params, values):
    """The parameters hold `values` inside the block and their own values again after it."""
    with torch.no_grad():
        own = [p.detach().clone() for p in params]
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, own):
                p.copy_(v)


def sam_steps(params, opt, steps, loss_of, kl_of, settings: dict) -> list[float]:
    """One step per item of `steps`: g = grad loss_of(item); the radius d is settings["rho"]
    without a target, radius_at_start at the first step, else min(scale * kl_of(item, theta_prev),
    rho_max); e = d g / |g| (the norm over every parameter, in float64); g' = grad loss_of(item)
    at theta + e; opt steps with g'. Returns each step's d."""
    previous, radii = None, []
    for item in steps:
        grads = torch.autograd.grad(loss_of(item), params)
        if settings["target"] is None:
            d = settings["rho"]
        elif previous is None:
            d = settings["radius_at_start"]
        else:
            d = min(settings["scale"] * kl_of(item, previous), settings["rho_max"])
        radii.append(d)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).float()
        e = [d * g / (norm + 1e-12) for g in grads]
        with torch.no_grad():
            for p, de in zip(params, e):
                p.add_(de)
        perturbed = torch.autograd.grad(loss_of(item), params)
        with torch.no_grad():
            for p, de in zip(params, e):
                p.sub_(de)
        previous = [p.detach().clone() for p in params]
        for p, g in zip(params, perturbed):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
    return radii
