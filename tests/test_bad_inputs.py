"""Bad input gets a clear ValueError naming the setting, before any collective, on every rank.

Each case here is a row of README's "Bad inputs" table (a test checks the table names them all).
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from launcher import torchrun
from machine import needs_deepspeed_fp16
from tiny import LR, make_batches, make_model

from tram_dist import TRAM, TRAMConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tram(config=None, **kw):
    model = make_model(0)
    return TRAM(model, torch.optim.AdamW(model.parameters(), lr=LR), config or TRAMConfig(target=None), **kw)


def _step(tram):
    return tram.step(make_batches(1)[0])


def _observe_then_step():
    tram, batch = _tram(TRAMConfig(target="noised_input")), make_batches(1)[0]
    loss, logits = tram.backend.model(**batch)
    tram.observe(batch, logits, loss=loss)
    tram.step(batch)


def _forward_around_the_embedding(model, batch):
    """Looks the embeddings up without calling the embedding layer (as inputs_embeds would)."""
    h = torch.tanh(model.fc1(model.embed.weight[batch["input_ids"]])).mean(dim=1)
    logits = model.fc2(h)
    return torch.nn.functional.cross_entropy(logits, batch["labels"]), logits


LOCAL_CASES = {
    "unknown_geometry": (lambda: TRAMConfig(geometry="adam"), r"TRAMConfig\.geometry must be one of \['sam', 'asam', 'fisher'\]"),
    "unknown_target": (lambda: TRAMConfig(target="prev"), r"TRAMConfig\.target must be one of"),
    "negative_rho": (lambda: TRAMConfig(rho=-0.1), r"TRAMConfig\.rho must be a finite number >= 0"),
    "ema_decay_of_one": (lambda: TRAMConfig(ema_decay=1.0), r"TRAMConfig\.ema_decay must be a finite number in \(0\.0, 1\.0\)"),
    "interval_zero": (lambda: TRAMConfig(interval=0), r"TRAMConfig\.interval must be an int >= 1"),
    "tram_fisher_on_asam": (lambda: TRAMConfig(geometry="asam", noised_pass=True), r"noised_pass=True \(TRAM-Fisher\) needs geometry='fisher'"),
    "unknown_config_key": (lambda: TRAMConfig.from_dict({"rhoo": 0.1}), r"unknown TRAMConfig field\(s\) \['rhoo'\]"),
    "noised_input_without_embedding_layer": (
        lambda: TRAM(torch.nn.Linear(3, 2), torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1),
                     TRAMConfig(target="noised_input")), r"needs the model's input-embedding layer"),
    "no_base_optimizer": (lambda: TRAM(make_model(0), None, TRAMConfig()), r"optimizer: a torch optimizer"),
    "forward_fn_returns_four_things": (
        lambda: _step(_tram(forward_fn=lambda m, b: (*m(**b), None, None))), r"forward function must return \(loss, logits\)"),
    "fp16_without_scaler": (
        lambda: TRAM(make_model(0).half(), torch.optim.SGD(make_model(0).parameters(), lr=0.1), TRAMConfig(target=None)),
        r"scaler: the model computes in float16, which needs loss scaling"),
    "empty_step": (lambda: _tram().step([]), r"tram\.step got an empty list of micro-batches"),
    "step_while_explicit_step_open": (_observe_then_step, r"tram\.step\(\) while an explicit step is open"),
    "descent_without_ascent": (lambda: _tram().descent_step(), r"descent_step\(\) without ascent_step\(\)"),
    "noised_input_layer_never_runs": (
        lambda: _step(_tram(TRAMConfig(target="noised_input"), forward_fn=_forward_around_the_embedding)),
        r"target='noised_input': the input-embedding layer never ran in the noised forward"),
    "mask_of_the_wrong_shape": (
        lambda: _step(_tram(TRAMConfig(target="noised_input"), forward_fn=lambda m, b: (*m(**b), torch.ones(3, dtype=torch.bool)))),
        r"mask \(3,\) must match the prediction shape \(8,\)"),
}


@pytest.mark.parametrize("case", sorted(LOCAL_CASES))
def test_local_bad_input(case):
    make, message = LOCAL_CASES[case]
    with pytest.raises(ValueError, match=message):
        make()


DIST_CASES = {
    "ds_max_grad_norm": r"TRAMConfig\.max_grad_norm: under DeepSpeed set gradient_clipping in the DeepSpeed config",
    "ds_micro_batch_count": r"tram\.step got 2 micro-batch\(es\) but the DeepSpeed config has gradient_accumulation_steps=1",
    "ds_optimizer_given": r"optimizer: pass None with a DeepSpeed engine",
    "fsdp_noised_without_embedding": r"needs the model's input-embedding layer",
    "rank_scope_on_sharded": r"TRAMConfig\.scope='rank' needs parameters replicated on every rank \(local, DDP\); the fsdp2 backend",
    "ds_micro_mode": r"TRAMConfig\.mode='micro' is not supported on the zero2 backend",
    "ds_fp16": r"fp16\.enabled: fp16 under DeepSpeed ZeRO stage 0 is not supported",
    "unwrapped_module_under_group": r"model: a plain TinyClassifier while a process group of 2 ranks exists",
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=needs_deepspeed_fp16 if c == "ds_fp16" else ())
                                  for c in sorted(DIST_CASES)])
def test_distributed_bad_input_fails_alike_on_every_rank_before_any_collective(tmp_path, case):
    stack = {"ds_fp16": "zero0", "unwrapped_module_under_group": "ddp"}.get(
        case, "zero2" if case.startswith("ds_") else "fsdp2")
    results = torchrun(tmp_path, "--stack", stack, "--bad", case)  # returns: nobody hung
    errors = [r["error"] for r in results]
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert re.search(DIST_CASES[case], errors[0]), errors[0]
    assert all(r["collectives"] == {} for r in results), [r["collectives"] for r in results]


CHECKPOINT_CASES = ("save_between_ascent_and_descent", "load_without_complete_checkpoint", "resume_with_other_settings")


def test_readme_table_lists_every_case():
    with open(os.path.join(ROOT, "README.md")) as f:
        table = re.search(r"^## Bad inputs\n(.*?)(?=^## )", f.read(), flags=re.S | re.M)
    assert table, "README.md has no '## Bad inputs' section"
    named = set(re.findall(r"^\| `(\w+)` \|", table.group(1), flags=re.M))
    expected = set(LOCAL_CASES) | set(DIST_CASES) | set(CHECKPOINT_CASES)
    assert named == expected, (sorted(expected - named), sorted(named - expected))
