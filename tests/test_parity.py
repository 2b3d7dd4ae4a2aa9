"""Parity: N TRAM steps on 2 ranks (half batches) equal one process on the full batch.

The reference (tests/reference.py) is written by hand from TRAM_SPEC.md, not with tram_dist.
fp32 tolerance 1e-6: the only differences are summation order (per-rank partial sums, the
gradient average of two halves against one mean over 8 rows), a few float32 ulps on weights of
order 0.1-1 after 3 AdamW steps; a wrong shard, norm or radius moves weights by >= lr * 1e-2.
"""
from __future__ import annotations

import pytest
import torch

from launcher import torchrun
from reference import reference_run
from tiny import LR, METHODS, make_batches, make_model

from tram_dist import TRAM, TRAMConfig

STEPS = 3
PARITY_METHODS = tuple(METHODS)  # sam, asam, fisher, and TRAM with each target
FP32_TOL = 1e-6

STACKS = [
    ("ddp", ""),
    *[("fsdp1", f"{s},{o}") for s in ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
      for o in ("orig", "flat")],
    ("fsdp2", ""),
    ("fsdp2", "hsdp"),
    ("zero0", ""),
    ("zero1", ""),
    ("zero2", ""),
    ("zero3", ""),
    ("zero3", "default_threshold"),
]

_reference_cache: dict = {}


def reference(method: str, world: int = 2):
    key = (method, world)
    if key not in _reference_cache:
        _reference_cache[key] = reference_run(METHODS[method], STEPS, world=world)
    return _reference_cache[key]


def assert_plain_grads(results: list[dict], tol: float) -> None:
    """Before any TRAM: the stack's own averaged gradient equals the full-batch gradient
    (guards against e.g. a stack that sums instead of averaging, pytorch#162338)."""
    model = make_model(0)
    loss, _ = model(**make_batches(1)[0])
    loss.backward()
    for rank, res in enumerate(results):
        for name, p in model.named_parameters():
            diff = (res["plain_grads"][name].float() - p.grad).abs().max().item()
            assert diff <= tol, f"rank {rank}: plain gradient of {name} differs by {diff:.3g}"


def assert_matches_reference(results: list[dict], methods, tol: float) -> None:
    for method in methods:
        ref_state, ref_metrics = reference(method)
        for rank, res in enumerate(results):
            got = res[method]
            for name, want in ref_state.items():
                diff = (got["state"][name].float() - want).abs().max().item()
                assert diff <= tol, f"{method} rank {rank}: {name} differs by {diff:.3g} (tol {tol:g})"
            for step, (m, r) in enumerate(zip(got["metrics"], ref_metrics)):
                for key in ("d", "loss", "grad_norm"):
                    assert m[key] == pytest.approx(r[key], rel=1e-5, abs=tol), f"{method} step {step} {key}"


@pytest.mark.parametrize("method", PARITY_METHODS)
def test_local_parity(method):
    """One process, the local backend, on the full batch: the wrapper against the reference."""
    model = make_model(0)
    tram = TRAM(model, torch.optim.AdamW(model.parameters(), lr=LR), TRAMConfig(**METHODS[method]))
    metrics = [tram.step(b) for b in make_batches(STEPS)]
    ref_state, ref_metrics = reference(method, world=1)
    for name, p in model.named_parameters():
        assert (p.detach() - ref_state[name]).abs().max().item() <= FP32_TOL, name
    for m, r in zip(metrics, ref_metrics):
        assert m["d"] == pytest.approx(r["d"], rel=1e-5, abs=FP32_TOL)


@pytest.mark.parametrize("stack,variant", STACKS, ids=[f"{s}-{v}" if v else s for s, v in STACKS])
def test_parity_fp32(tmp_path, stack, variant):
    results = torchrun(tmp_path, "--stack", stack, "--variant", variant,
                       "--methods", ",".join(PARITY_METHODS), "--steps", str(STEPS))
    assert_plain_grads(results, FP32_TOL)
    assert_matches_reference(results, PARITY_METHODS, FP32_TOL)
