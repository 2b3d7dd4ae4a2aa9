"""Bad input gets a clear ValueError naming the setting, before any collective, on every rank.

Each case here is a row of the "Bad inputs" table in docs/troubleshooting.md (a test checks the
table names them all).
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from launcher import torchrun
from machine import CPU_FP16, needs_deepspeed_fp16
from tiny import LR, make_batches, make_model

from tram_dist import TRAM, TRAMConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tram(config=None, **kw):
    model = make_model(0)
    return TRAM(model, torch.optim.AdamW(model.parameters(), lr=LR), config or TRAMConfig(target=None), **kw)


def _with_sgd(model, config):
    return TRAM(model, torch.optim.SGD(model.parameters(), lr=0.1), config)


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
        lambda: _with_sgd(torch.nn.Linear(3, 2), TRAMConfig(target="noised_input")), r"needs the model's input-embedding layer"),
    "no_base_optimizer": (lambda: TRAM(make_model(0), None, TRAMConfig()), r"optimizer: a torch optimizer"),
    "forward_fn_returns_four_things": (
        lambda: _step(_tram(forward_fn=lambda m, b: (*m(**b), None, None))), r"forward function must return \(loss, logits\)"),
    "fp16_without_scaler": (
        lambda: _with_sgd(make_model(0).half(), TRAMConfig(target=None)),
        r"scaler: the model computes in float16, which needs loss scaling"),
    "empty_step": (lambda: _tram().step([]), r"tram\.step got an empty list of micro-batches"),
    "step_while_explicit_step_open": (_observe_then_step, r"tram\.step\(\) while an explicit step is open"),
    "descent_without_ascent": (lambda: _tram().descent_step(), r"descent_step\(\) without ascent_step\(\)"),
    "noised_input_layer_never_runs": (
        lambda: _step(_tram(TRAMConfig(target="noised_input"), forward_fn=_forward_around_the_embedding)),
        r"target='noised_input': the input-embedding layer never ran in the noised forward"),
    "optimizer_over_another_model": (
        lambda: TRAM(make_model(0), torch.optim.AdamW(make_model(1).parameters(), lr=LR), TRAMConfig(target=None)),
        r"optimizer: 5 of the base optimizer's 5 tensors are not parameters of the TinyClassifier TRAM wraps, so the "
        r"update would never reach the model"),
    "float_setting_not_a_number": (lambda: TRAMConfig(rho="0.05").validate(),
                                   r"TRAMConfig\.rho must be a finite number >= 0\.0, got '0\.05'"),
    "int_setting_given_a_float": (lambda: TRAMConfig(interval=2.0).validate(), r"TRAMConfig\.interval must be an int >= 1, got 2\.0"),
    "mask_of_the_wrong_shape": (
        lambda: _step(_tram(TRAMConfig(target="noised_input"), forward_fn=lambda m, b: (*m(**b), torch.ones(3, dtype=torch.bool)))),
        r"mask \(3,\) must match the prediction shape \(8,\)"),
}


@pytest.mark.parametrize("case", sorted(LOCAL_CASES))
def test_local_bad_input(case):
    make, message = LOCAL_CASES[case]
    with pytest.raises(ValueError, match=message):
        make()


def test_numpy_scalars_for_numeric_settings_give_the_float_result():
    """np.float32(0.05) for rho, np.int64 for interval: the same step, to the bit, as the Python
    numbers (validate stores plain floats and ints, so the config also saves and compares as usual)."""
    import numpy as np

    def run(config):
        model = make_model(0)
        tram = TRAM(model, torch.optim.AdamW(model.parameters(), lr=LR), config)
        for batch in make_batches(2):
            tram.step(batch)
        return model, tram.config

    plain, plain_cfg = run(TRAMConfig(target="noised_input", rho=float(np.float32(0.05)), scale=3.0, interval=1, seed=2))
    numpy, numpy_cfg = run(TRAMConfig(target="noised_input", rho=np.float32(0.05), scale=np.float64(3.0),
                                      interval=np.int64(1), seed=np.int32(2)))
    assert numpy_cfg == plain_cfg and type(numpy_cfg.rho) is float and type(numpy_cfg.interval) is int
    for p, q in zip(plain.parameters(), numpy.parameters()):
        assert torch.equal(p, q)


DIST_CASES = {
    "ds_max_grad_norm": r"TRAMConfig\.max_grad_norm: under DeepSpeed set gradient_clipping in the DeepSpeed config",
    "ds_micro_batch_count": r"tram\.step got 2 micro-batch\(es\) but the DeepSpeed config has gradient_accumulation_steps=1",
    "ds_optimizer_given": r"optimizer: pass None with a DeepSpeed engine",
    "ds_scaler_given": r"scaler: pass None with a DeepSpeed engine; it scales the loss itself",
    "fsdp_noised_without_embedding": r"needs the model's input-embedding layer",
    "rank_scope_on_sharded": r"TRAMConfig\.scope='rank' needs parameters replicated on every rank \(local, DDP\); the fsdp2 backend",
    "ds_micro_mode": r"TRAMConfig\.mode='micro' is not supported on the zero2 backend",
    "ds_fp16": r"fp16\.enabled: fp16 under DeepSpeed ZeRO stage 0 is not supported",
    "unwrapped_module_under_group": r"model: a plain TinyClassifier while a process group of 2 ranks exists",
    "fsdp2_uneven_micro_batches": r"tram\.step: the ranks passed different numbers of micro-batches to one step \(from 1 "
                                  r"to 2\); on the fsdp2 backend every rank must pass the same number",
    "zero2_uneven_micro_batches": r"tram\.step: the ranks passed different numbers of micro-batches to one step \(from 1 "
                                  r"to 2\); on the zero2 backend",
    "fsdp1_optimizer_before_wrap": r"optimizer: 5 of the base optimizer's 5 tensors are not parameters of the "
                                   r"FullyShardedDataParallel TRAM wraps",
    "fsdp2_tensor_parallel": r"fully_shard: parameter '[\w.]+' is placements \(.*\) on a 2-D mesh; tram_dist supports "
                             r"FSDP2 alone",
    "ds_internals_missing": r"deepspeed 0\.19\.8 lacks the parameters' fragment mappings .* tram_dist is tested with "
                            r"deepspeed 0\.19\.8",
    "fsdp1_internals_missing": r"torch 2\.13\.0\S* lacks FlatParamHandle\.post_reshard, which tram_dist's backend relies on",
}
# The micro-batch count check is itself one tiny all-reduce (of 2 numbers), before the step's first forward.
ONE_COUNT_CHECK = {"fsdp2_uneven_micro_batches", "zero2_uneven_micro_batches"}


def _dist_cases():
    return [c for c in sorted(DIST_CASES) if c != "ds_fp16" or CPU_FP16]


@pytest.fixture(scope="module")
def dist_errors(tmp_path_factory):
    """All distributed cases in one 2-rank launch, one after another in one process group."""
    results = torchrun(tmp_path_factory.mktemp("bad"), "--stack", "zero2", "--bad", ",".join(_dist_cases()))
    return {case: [r[case] for r in results] for case in _dist_cases()}  # returns: nobody hung


@pytest.mark.parametrize("case", [pytest.param(c, marks=needs_deepspeed_fp16 if c == "ds_fp16" else ())
                                  for c in sorted(DIST_CASES)])
def test_distributed_bad_input_fails_alike_on_every_rank_before_any_collective(dist_errors, case):
    errors = [r["error"] for r in dist_errors[case]]
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert re.search(DIST_CASES[case], errors[0]), errors[0]
    expected = {"c10d::allreduce_": 1} if case in ONE_COUNT_CHECK else {}
    assert all(r["collectives"] == expected for r in dist_errors[case]), [r["collectives"] for r in dist_errors[case]]


CHECKPOINT_CASES = ("save_between_ascent_and_descent", "load_without_complete_checkpoint", "resume_with_other_settings",
                    "reused_tag_save_died", "truncated_state_file", "foreign_state_file")


def test_readme_table_lists_every_case():
    with open(os.path.join(ROOT, "docs", "troubleshooting.md")) as f:
        table = re.search(r"^## Bad inputs\n(.*?)(?=^## )", f.read(), flags=re.S | re.M)
    assert table, "docs/troubleshooting.md has no '## Bad inputs' section"
    named = set(re.findall(r"^\| `(\w+)` \|", table.group(1), flags=re.M))
    expected = set(LOCAL_CASES) | set(DIST_CASES) | set(CHECKPOINT_CASES)
    assert named == expected, (sorted(expected - named), sorted(named - expected))
