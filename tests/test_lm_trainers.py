"""The routes LLM fine-tuning takes (tests/lm_trainer_worker.py, one 2-rank launch): TRAMTrainer
and TRL's SFTTrainer (tram_dist.trl) on DDP and ZeRO-3, with gradient checkpointing and packed
sequences, against a single-process reference written here from the rules (docs/how-it-works.md),
not with tram_dist, on the UNPACKED sequences of each step's global window:

    L(theta) = sum over the window's predicted tokens of -log p(token) / (their number)

the Trainer's token-weighted accumulation (num_items_in_batch), in pass 1 and pass 2; the radius
is scale x the mean KL(p(theta_prev) || p(theta)) over the same tokens (capped), SAM geometry,
SGD (lr 0.5; see make_model for why not AdamW). fp32 within 1e-6 (measured: 1.2e-7; sums taken
in another order across 2 ranks and micro-batches). The sequences have 3 to 12 tokens, so a step
that weighed micro-batches equally would end elsewhere: the test checks that too.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl", reason="trl is in the test extra (pip install -e '.[test]')")

from launcher import torchrun  # noqa: E402
from lm_reference import sam_steps, weights_at  # noqa: E402
from reference import kl_per_prediction  # noqa: E402
from lm_trainer_worker import GAS, LR, ROUTES, SETTINGS, STEPS, WORLD, make_model  # noqa: E402

TOL = 1e-6


def split(micro_batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, labels) of each sequence of a collated micro-batch: padded rows cut to their
    attention mask, a packed row cut where position_ids restart at 0."""
    if "attention_mask" in micro_batch:
        keep = micro_batch["attention_mask"].bool()
        return [(ids[k], lab[k]) for ids, lab, k in zip(micro_batch["input_ids"], micro_batch["labels"], keep)]
    starts = (micro_batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [micro_batch["input_ids"].shape[1]]
    return [(micro_batch["input_ids"][0, a:b], micro_batch["labels"][0, a:b]) for a, b in zip(starts, starts[1:])]


def token_terms(model, ids, labels, target_logits=None):
    """(sum of -log p over the predicted tokens, their count) of one sequence: position t predicts
    token t+1 where label t+1 is not -100. With target_logits: (KL sum in float64, count)."""
    logits = model(input_ids=ids[None]).logits[0, :-1]
    wanted = labels[1:]
    keep = wanted != -100
    if target_logits is not None:
        return kl_per_prediction(logits.detach(), target_logits)[keep].sum(), keep.sum()
    return F.cross_entropy(logits[keep], wanted[keep], reduction="sum"), keep.sum()


def reference(windows, settings: dict, weigh_tokens: bool = True):
    """windows: per step, the micro-batches of every rank (lists of sequences)."""
    model = make_model()
    params = list(model.parameters())

    def token_mean(seqs):
        terms = [token_terms(model, ids, lab) for ids, lab in seqs]
        return sum(t[0] for t in terms) / sum(t[1] for t in terms)

    def objective(window):
        if weigh_tokens:  # one token mean over the whole window
            return token_mean([s for micro in window for s in micro])
        means = [token_mean(micro) for micro in window]  # each micro-batch's own, weighed equally
        return sum(means) / len(means)

    def kl_of(window, previous):
        seqs = [s for micro in window for s in micro]
        with torch.no_grad():
            with weights_at(params, previous):
                targets = [model(input_ids=ids[None]).logits[0, :-1] for ids, _ in seqs]
            kl = [token_terms(model, ids, lab, t) for (ids, lab), t in zip(seqs, targets)]
        return (sum(k[0] for k in kl) / sum(k[1] for k in kl)).item()

    radii = sam_steps(params, torch.optim.SGD(params, lr=LR), windows, objective, kl_of, settings)
    return {n: p.detach() for n, p in model.named_parameters()}, radii


def global_windows(micro_batches: list[list[dict]]) -> list[list[list]]:
    """Step s's window: micro-batches s*GAS .. s*GAS+GAS-1 of every rank, each as its sequences."""
    return [[split(micro_batches[r][s * GAS + i]) for r in range(WORLD) for i in range(GAS)] for s in range(STEPS)]


@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    results = torchrun(tmp_path_factory.mktemp("lm_trainers"), script="lm_trainer_worker.py", timeout=600)
    return {name: [r[name] for r in results] for name in ROUTES}


@pytest.mark.parametrize("name", list(ROUTES))
def test_route_matches_the_token_weighted_reference(routes, name):
    kind, stack, settings, extra = ROUTES[name]
    ranks = routes[name]
    micro_batches = ranks[0]["micro_batches"]
    assert all(len(m) == STEPS * GAS for m in micro_batches), [len(m) for m in micro_batches]
    windows = global_windows(micro_batches)
    counts = [[sum(int((lab[1:] != -100).sum()) for _, lab in micro) for micro in w] for w in windows]
    assert any(len(set(c)) > 1 for c in counts), counts  # unequal token counts within a window
    want, radii = reference(windows, SETTINGS[settings])
    equal, _ = reference(windows, SETTINGS[settings], weigh_tokens=False)
    assert max((want[n] - equal[n]).abs().max().item() for n in want) > 1e3 * TOL  # the weighting matters
    for rank, run in enumerate(ranks):
        assert run["backend"] == {"ddp": "ddp", "zero3": "zero3"}[stack]
        got = run["weights"]
        worst = max((got[n].float() - want[n]).abs().max().item() for n in want)
        assert worst <= TOL, (name, rank, worst)
        logs = [entry for entry in run["logs"] if "loss" in entry]
        assert [e["tram/d"] for e in logs] == pytest.approx(radii, rel=1e-6), name
        assert all(e["tram/e_norm"] > 0 for e in logs)
        assert run["checkpointing"] == bool(extra.get("gradient_checkpointing")), name


@pytest.mark.parametrize("name", [n for n, r in ROUTES.items() if r[0] == "sft"])
def test_sft_runs_each_tram_forward_once_and_counts_tokens_once(routes, name):
    """Per micro-batch: pass 1, the target forward (from step 2 of "previous"), pass 2; SFTTrainer's
    own loss would add a forward for the logits to each. num_tokens: each token once per step."""
    _, _, settings, extra = ROUTES[name]
    ranks = routes[name]
    per_step = [2 * GAS] * STEPS if settings == "sam" else [2 * GAS] + [3 * GAS] * (STEPS - 1)
    tokens = 0
    for step in range(STEPS):
        for r in range(WORLD):
            for micro in ranks[0]["micro_batches"][r][step * GAS:(step + 1) * GAS]:
                tokens += int(micro["attention_mask"].sum()) if "attention_mask" in micro else micro["input_ids"].shape[1]
    for run in ranks:
        assert run["forwards"] == per_step, (name, run["forwards"])
        logs = [entry for entry in run["logs"] if "loss" in entry]
        assert logs[-1]["num_tokens"] == tokens, (name, logs[-1]["num_tokens"], tokens)
        assert all(0.0 <= e["mean_token_accuracy"] <= 1.0 and e["entropy"] > 0 for e in logs)
    if extra.get("padding_free"):  # really packed: one row per micro-batch, no padding
        assert all("attention_mask" not in m and m["input_ids"].shape[0] == 1 for m in ranks[0]["micro_batches"][0])
