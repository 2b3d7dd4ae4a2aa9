"""Checks shared by the distributed parity and training tests: the reference and comparisons."""
from __future__ import annotations

import pytest
import torch

from reference import reference_run
from tiny import METHODS, make_batches, make_model

STEPS = 3
FP32_TOL = 1e-6
_reference_cache: dict = {}


def reference(method: str, world: int = 2):
    """The reference run of a method (cached: it is deterministic)."""
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


def d_tolerance(ref_metrics: dict, tol: float) -> float:
    """d = scale * KL; the KL of two close distributions is a difference of log-probs (fp32 ulp
    ~1.2e-7 near log(1/3)), so its absolute error is ~2.5e-7 times the scale in use."""
    return max(tol, (ref_metrics.get("kl_scale") or 1.0) * 2.5e-7)


def assert_matches_reference(results: list[dict], methods, tol: float) -> None:
    for method in methods:
        ref_state, ref_metrics = reference(method)
        for rank, res in enumerate(results):
            got = res[method]
            for name, want in ref_state.items():
                diff = (got["state"][name].float() - want).abs().max().item()
                assert diff <= tol, f"{method} rank {rank}: {name} differs by {diff:.3g} (tol {tol:g})"
            for step, (m, r) in enumerate(zip(got["metrics"], ref_metrics)):
                if not r:  # a plain step (interval > 1) has no radius
                    continue
                assert m["d"] == pytest.approx(r["d"], rel=1e-5, abs=d_tolerance(r, tol)), f"{method} step {step} d"
                if r["kl_scale"] is not None:  # the scale in use (scale="auto": once calibrated)
                    assert m["kl_scale"] == pytest.approx(r["kl_scale"], rel=1e-5), f"{method} step {step} kl_scale"
                for key in ("loss", "grad_norm"):
                    assert m[key] == pytest.approx(r[key], rel=1e-5, abs=tol), f"{method} step {step} {key}"


def max_diff(state: dict, ref_state: dict) -> float:
    """The largest absolute weight difference between a run's full state and a reference's."""
    return max((state[k].float() - v).abs().max().item() for k, v in ref_state.items())


def assert_skipped_step(results: list[dict], method: str, scales=None) -> None:
    """Step 1 was skipped on every rank with theta bitwise unchanged, steps 0 and 2 were not (and
    moved the weights); with a loss scaler, the scale went from 2^16 to 2^15 at the skip."""
    for rank, res in enumerate(results):
        run = res[method]
        assert [m["skipped"] for m in run["metrics"]] == [0.0, 1.0, 0.0], (rank, run["metrics"])
        if scales:
            assert [m["scale"] for m in run["metrics"]] == scales, (rank, run["metrics"])
        before, after = run["states_before_step"][1], run["states_before_step"][2]
        assert all(torch.equal(before[k], after[k]) for k in before), f"rank {rank}: the skipped step moved theta"
        assert all(torch.isfinite(v).all() for v in run["state"].values())
        assert any(not torch.equal(after[k], run["state"][k]) for k in after), "training did not go on"
