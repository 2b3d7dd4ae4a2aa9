"""LoRA adapters (a real peft model) under TRAM: the recommended geometry perturbs from step 1,
the default one warns where it would not, and 2 ranks on DDP, ZeRO-3 and FSDP2 match a
single-process reference written here from the rules (docs/how-it-works.md), not with tram_dist."""
from __future__ import annotations

import warnings

import pytest
import torch

from launcher import torchrun
from lm_reference import sam_steps, weights_at
from reference import kl_per_prediction
from peft_worker import LR, SETTINGS, global_batches, lora_lm

from tram_dist import TRAM, TRAMConfig
from tram_dist.forward import causal_lm_forward


def reference(steps_batches):
    """SAM geometry, "previous" target, AdamW on the adapters, the full batch on one process."""
    model = lora_lm()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]

    def kl_of(batch, previous):
        with torch.no_grad():
            current = model(**batch).logits
            with weights_at(params, previous):
                target = model(**batch).logits
        # forward KL per next-token position (the last predicts nothing), averaged over the batch
        return kl_per_prediction(current[:, :-1], target[:, :-1]).mean().item()

    radii = sam_steps(params, torch.optim.AdamW(params, lr=LR), steps_batches, lambda b: model(**b).loss, kl_of,
                      SETTINGS)
    return {n: p.detach() for n, p in model.named_parameters()}, names, radii


def test_recommended_adapter_settings_perturb_from_the_first_step_and_the_default_warns():
    """LoRA's B starts at zero, so ASAM's T = |theta| (eta 0, the default) gives e = 0 at step 1:
    TRAM warns once. geometry="sam" (docs/trainer-and-cli.md's setting for adapters) gives |e| = d from step 1."""
    batch = {k: v[:2] for k, v in global_batches()[0].items()}

    def first_step(config):
        model = lora_lm()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        return TRAM(model, opt, config, forward_fn=causal_lm_forward).step(batch)

    with pytest.warns(UserWarning, match=r"e = 0 at step 1 although the gradient is not zero .*\(LoRA's B matrices"):
        m = first_step(TRAMConfig(target="previous", radius_at_start=0.05))
    assert m["e_norm"] == 0.0 and m["grad_norm"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        m = first_step(TRAMConfig(**SETTINGS))
    assert m["e_norm"] == pytest.approx(SETTINGS["radius_at_start"], rel=1e-6)


def test_lora_on_ddp_zero3_fsdp2_matches_the_reference(tmp_path):
    """3 steps on 2 ranks (half the batch each) against the full-batch reference: adapters within
    1e-6 (fp32; a step's sums are reduced in another order across 2 ranks), frozen weights
    unchanged to the bit, the radius of each step within 1e-6 relative."""
    batches = global_batches()
    want, trained, radii = reference(batches)
    start = dict(lora_lm().named_parameters())
    results = torchrun(tmp_path, script="peft_worker.py")
    for rank, res in enumerate(results):
        for stack, run in res.items():
            got = {n.replace("_fsdp_wrapped_module.", ""): v for n, v in run["weights"].items()}
            assert set(got) == set(want), (stack, sorted(set(got) ^ set(want))[:4])
            for n, v in got.items():
                if n in trained:
                    assert (v - want[n]).abs().max().item() <= 1e-6, (stack, rank, n)
                else:
                    assert torch.equal(v, start[n].detach()), (stack, rank, n)
            assert [m["d"] for m in run["metrics"]] == pytest.approx(radii, rel=1e-6), stack
            assert all(m["e_norm"] > 0 for m in run["metrics"]), stack
