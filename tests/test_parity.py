"""Parity: N TRAM steps on 2 ranks (half batches) equal one process on the full batch.

The reference (tests/reference.py) is written by hand from the paper's rules, not with tram_dist.
fp32 tolerance 1e-6: the only differences are summation order (per-rank partial sums, the
gradient average of two halves against one mean over 8 rows), a few float32 ulps on weights of
order 0.1-1 after 3 AdamW steps; a wrong shard, norm or radius moves weights by >= lr * 1e-2.
"""
from __future__ import annotations

import pytest
import torch

from launcher import torchrun, torchrun_group
from checks import FP32_TOL, STEPS, assert_matches_reference, assert_plain_grads, d_tolerance, max_diff, reference
from reference import reference_run
from stacks import CLIP
from tiny import LR, METHODS, make_batches, make_model, micro_batches

from tram_dist import TRAM, TRAMConfig

PARITY_METHODS = tuple(METHODS)  # sam, asam, fisher, and TRAM with each target

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
        if r:  # a plain step (interval > 1) has no radius
            assert m["d"] == pytest.approx(r["d"], rel=1e-5, abs=d_tolerance(r, FP32_TOL))
            if r["kl_scale"] is not None:
                assert m["kl_scale"] == pytest.approx(r["kl_scale"], rel=1e-5)


@pytest.mark.parametrize("method", ("sam", "tram_noised", "tram_previous", "tram_fisher"))
def test_local_accumulation_parity(method):
    """One process, a list of 2 micro-batches per step: one perturbation from both."""
    model = make_model(0)
    tram = TRAM(model, torch.optim.AdamW(model.parameters(), lr=LR), TRAMConfig(**METHODS[method]))
    for b in make_batches(STEPS):
        tram.step(micro_batches(b, 2))
    ref_state, _ = reference_run(METHODS[method], STEPS, world=1, micro=2)
    assert max_diff(dict(model.named_parameters()), ref_state) <= FP32_TOL


def run_stack(tmp_path_factory, stack: str, variant: str) -> list[dict]:
    """Every stack variant in one launch, shared by the parity and the collective-count tests."""
    return torchrun_group(tmp_path_factory, "fp32", STACKS, "--methods", ",".join(PARITY_METHODS),
                          "--steps", str(STEPS))[stack, variant]


STACK_IDS = [f"{s}-{v}" if v else s for s, v in STACKS]


@pytest.mark.parametrize("stack,variant", STACKS, ids=STACK_IDS)
def test_parity_fp32(tmp_path_factory, stack, variant):
    results = run_stack(tmp_path_factory, stack, variant)
    assert_plain_grads(results, FP32_TOL)
    assert_matches_reference(results, PARITY_METHODS, FP32_TOL)
    numels = [res["sam"]["local_numels"] for res in results]
    if stack == "fsdp1" and variant.endswith("orig") and not variant.startswith("NO_SHARD"):
        # uneven shards: some parameter has no element at all on one rank, and the run still matched
        assert any(0 in n for n in numels), numels
        assert sum(map(sum, numels)) == 451
    for rank, res in enumerate(results):
        for method in PARITY_METHODS:  # snapshots hold exactly this rank's pieces: sharded as the model
            snap = res[method]["snapshot_numels"]
            assert snap is None or snap == res[method]["local_numels"], (method, rank, snap)


ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER = "c10d::allreduce_", "c10d::_allgather_base_", "c10d::_reduce_scatter_base_"


@pytest.mark.parametrize("stack,variant", STACKS, ids=STACK_IDS)
def test_one_packed_all_reduce_per_step(tmp_path_factory, stack, variant):
    """A TRAM step's collectives = a plain two-pass step's (the two passes' own gradient
    reductions and gathers) + exactly one all-reduce, + the target forward's own gathers; on the
    sharded stacks (FSDP, ZeRO) one more all-reduce of 2 numbers first: every rank passes the
    step the same number of micro-batches (else their gathers would wait on each other for good).

    On ZeRO-1/2 writing e into the replicated bit16 weights adds one all-gather of the padded
    bit16 partitions (P elements); on ZeRO-3 with persistent parameters the next forward
    gathers them again after the write (P elements).
    Counted in steady state (the last step), on every rank, from the c10d ops it dispatches.
    """
    for rank, res in enumerate(run_stack(tmp_path_factory, stack, variant)):
        base = res["baseline"]["two_pass"]
        for method in PARITY_METHODS:
            step = res[method]["collectives"]["counts"]
            added = 1 if stack == "ddp" else 2
            assert step.get(ALL_REDUCE, 0) == base.get(ALL_REDUCE, 0) + added, (method, rank, step, base)
            assert step.get(REDUCE_SCATTER, 0) == base.get(REDUCE_SCATTER, 0), (method, rank, step, base)
            # any other kind of collective (broadcast, all-to-all, ...) would be new
            assert set(step) <= {ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER} | set(base), (method, step)
        if stack == "zero3":
            # Writing e (or a snapshot) releases the gathered copies; nothing is re-gathered per
            # parameter (that took 20 all-gathers against SAM's 10 here). SAM gathers the model
            # once per forward (2 x 452 elements; this model's backward reuses them). A target
            # forward runs between pass 1's forward and backward (the logits are released before
            # the backward), so it gathers the model once and pass 1's backward once more: at
            # most 5 full gathers (measured: 5 x 452, in 9 per-module all-gathers, with the
            # default persistence threshold 2 x 452 for TRAM-x and 4 x 452 for snapshot targets).
            sam = res["sam"]["collectives"]["elements"].get(ALL_GATHER, 0)
            for method in PARITY_METHODS:
                gathered = res[method]["collectives"]["elements"].get(ALL_GATHER, 0)
                assert gathered <= sam // 2 * 5, (method, rank, gathered, sam)
        sam = res["sam"]["collectives"]
        extra = sam["elements"].get(ALL_GATHER, 0) - res["baseline"]["two_pass_elements"].get(ALL_GATHER, 0)
        expected = EXTRA_GATHER_ELEMENTS.get((stack, variant), 0)
        assert extra == expected, f"{stack} {variant}: SAM step all-gathers {extra} extra elements, expected {expected}"


# The model has P = 451 parameters; DeepSpeed pads its flat bit16 buffer to 452 for 2 ranks.
EXTRA_GATHER_ELEMENTS = {("zero1", ""): 452, ("zero2", ""): 452, ("zero3", "default_threshold"): 452}


BF16_STACKS = [("ddp", ""), ("fsdp1", "FULL_SHARD,orig"), ("fsdp2", ""), ("zero0", ""), ("zero1", ""),
               ("zero2", ""), ("zero3", "")]
BF16_METHODS = ("sam", "tram_noised", "tram_previous")
# bf16 tolerance. The forward runs in bf16 (unit roundoff u = 2^-8 = 3.9e-3) with fp32
# accumulation, so each gradient entry is off by about u times its size (entries here are
# below ~0.35). The runs use SGD, where a weight error is lr times the summed gradient errors:
# 3 steps * lr 0.5 * u * 0.35 = 2.0e-3. The test also requires each method's own effect (TRAM
# against plain SGD from the same start) to be at least twice this, so a run that dropped or
# mis-scaled e would fail. The radius d is compared to 3% (KL of bf16 logits).
BF16_TOL = 2e-3


@pytest.mark.parametrize("stack,variant", BF16_STACKS, ids=[s for s, _ in BF16_STACKS])
def test_parity_bf16(tmp_path_factory, stack, variant):
    """bf16 on every backend: DDP under autocast, FSDP1 MixedPrecision, FSDP2 MixedPrecisionPolicy
    (fp32 parameters or shards, bf16 compute), and DeepSpeed's bf16 (bf16 weights, fp32 masters)."""
    results = torchrun_group(tmp_path_factory, "bf16", BF16_STACKS, "--dtype", "bf16", "--optim", "sgd",
                             "--methods", ",".join(BF16_METHODS), "--steps", str(STEPS))[stack, variant]
    # DeepSpeed builds its fp32 masters from the bf16-cast model; FSDP2 keeps fp32 shards.
    bf16_init = stack.startswith("zero")
    for method in BF16_METHODS:
        ref_state, ref_metrics = reference_run(METHODS[method], STEPS, optim="sgd", bf16_init=bf16_init)
        plain_state, _ = reference_run(dict(METHODS[method], target=None, rho=0.0), STEPS, optim="sgd",
                                       bf16_init=bf16_init)
        effect = max_diff(plain_state, ref_state)
        assert effect >= 2 * BF16_TOL, f"{method}: TRAM moves the weights by only {effect:.2g}"
        for rank, res in enumerate(results):
            diff = max_diff(res[method]["state"], ref_state)
            assert diff <= BF16_TOL, f"{stack} {method} rank {rank}: bf16 weights off by {diff:.3g}"
            for m, r in zip(res[method]["metrics"], ref_metrics):
                assert m["d"] == pytest.approx(r["d"], rel=0.03)


@pytest.mark.parametrize("stack", ["zero1", "zero3"])
def test_explicit_calls_under_deepspeed(tmp_path, stack):
    """observe / ascent_step / descent_step around a second pass the user drives through the
    engine give the same weights as the reference (and so as tram.step)."""
    methods = ("sam", "tram_noised", "tram_previous", "tram_fisher")
    results = torchrun(tmp_path, "--stack", stack, "--explicit", "--methods", ",".join(methods),
                       "--steps", str(STEPS))
    assert_matches_reference(results, methods, FP32_TOL)


def test_deepspeed_gradient_clipping_acts_on_the_descent_gradient(tmp_path):
    """A ZeRO config's own gradient_clipping is honoured: it clips g' (the gradient at theta+e)."""
    methods = ("sam", "tram_previous")
    results = torchrun(tmp_path, "--stack", "zero2", "--variant", "clip", "--methods", ",".join(methods),
                       "--steps", str(STEPS))
    for method in methods:
        ref_state, _ = reference_run(METHODS[method], STEPS, clip=CLIP)
        unclipped, _ = reference_run(METHODS[method], STEPS)
        assert max_diff(unclipped, ref_state) > 100 * FP32_TOL
        for res in results:
            diff = max_diff(res[method]["state"], ref_state)
            assert diff <= FP32_TOL, f"{method}: clipped weights off by {diff:.3g}"


ACCUM_STACKS = [("ddp", ""), ("fsdp1", "FULL_SHARD,orig"), ("fsdp1", "NO_SHARD,flat"), ("fsdp2", ""),
                ("fsdp2", "hsdp"), ("zero0", ""), ("zero1", ""), ("zero2", ""), ("zero3", "")]
ACCUM_METHODS = ("sam", "tram_noised", "tram_previous", "tram_fisher")


@pytest.mark.parametrize("stack,variant", ACCUM_STACKS, ids=[f"{s}-{v}" if v else s for s, v in ACCUM_STACKS])
def test_accumulation_parity(tmp_path_factory, stack, variant):
    """Global mode with 2 micro-batches per rank (DeepSpeed: gradient_accumulation_steps=2): one
    perturbation from the gradient of all micro-batches of all ranks, the KL averaged over all of
    them; equal to one process on the full batch (the reference draws the noise per micro-batch)."""
    results = torchrun_group(tmp_path_factory, "accumulation", ACCUM_STACKS, "--micro", "2",
                             "--methods", ",".join(ACCUM_METHODS), "--steps", str(STEPS))[stack, variant]
    for method in ACCUM_METHODS:
        ref_state, _ = reference_run(METHODS[method], STEPS, micro=2)
        for rank, res in enumerate(results):
            diff = max_diff(res[method]["state"], ref_state)
            assert diff <= FP32_TOL, f"{stack} {variant} {method} rank {rank}: off by {diff:.3g}"
    if stack == "ddp":  # no_sync: one gradient all-reduce per pass, plus the packed one
        assert results[0]["sam"]["collectives"]["counts"] == {ALL_REDUCE: 3}



