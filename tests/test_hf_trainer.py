"""The real HF Trainer: TRAMTrainer's steps equal TRAM's own steps on the same micro-batches.

2 gloo ranks under DDP, DeepSpeed ZeRO-2 and ZeRO-3 (tests/hf_worker.py), gradient accumulation
2 with the Trainer's short last window, its linear schedule and max_grad_norm clipping. fp32:
both runs do the same float operations in the same order, so they agree to rounding (observed
0 to 4e-9); 1e-6 is the project's fp32 bound, and each run moves the weights by 2e-3, so a
missed or doubled step, a wrong radius or an unclipped gradient would show far above it.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from launcher import WORLD, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-6
CLIP = 0.4
LOGGED = ("tram/d", "tram/kl", "tram/grad_norm", "tram/e_norm", "tram/loss_perturbed")


def run_worker(tmp_path, *args: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), os.path.join(HERE, "hf_worker.py"), "--out", str(tmp_path),
           *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def training_logs(history: list[dict]) -> list[dict]:
    return [entry for entry in history if "loss" in entry]


STACKS = {"ddp": ("DistributedDataParallel", "ddp"), "zero2": ("DeepSpeedEngine", "zero2"),
          "zero3": ("DeepSpeedEngine", "zero3")}


@pytest.mark.parametrize("stack,target,resume", [
    ("ddp", "noised_input", False),
    ("zero2", "noised_input", False),
    ("zero3", "noised_input", False),
    ("ddp", "previous", True),
    ("zero3", "previous", True),
])
def test_trainer_steps_equal_tram_steps(tmp_path, stack, target, resume):
    results = run_worker(tmp_path, "--stack", stack, "--target", target, *(["--resume"] if resume else []))
    wrapped, backend = STACKS[stack]
    for rank, r in enumerate(results):
        info = r["info"]
        assert (info["wrapped"], info["backend"], info["world"]) == (wrapped, backend, WORLD), info
        if stack.startswith("zero"):  # the Trainer filled the config's "auto" values
            assert (info["stage"], info["gas"], info["clipping"]) == (int(stack[-1]), 2, CLIP), info
        assert r["windows"] == [2, 2, 1], f"rank {rank}: accumulation windows {r['windows']}"

        assert max_diff(r["trainer"], r["wrapper"]) <= TOL
        assert max_diff(r["trainer"], r["init"]) >= 1e3 * TOL  # the comparison is not vacuous

        logs = training_logs(r["logs"])
        assert len(logs) == 3
        for entry in logs:
            assert all(key in entry for key in LOGGED), entry
            assert entry["tram/skipped"] == 0.0
        assert [round(e["learning_rate"] / 1e-3, 6) for e in logs] == [1.0, round(2 / 3, 6), round(1 / 3, 6)]
        assert max(e["grad_norm"] for e in logs) > CLIP  # the Trainer's clipping acted on g'
        if target == "noised_input":
            assert all(e["tram/d"] > 0 and e["tram/e_norm"] > 0 for e in logs)
        else:  # "previous" has no history at step 1, then a radius from theta_{t-1}
            assert logs[0]["tram/d"] == 0.0 and logs[1]["tram/d"] > 0 and logs[2]["tram/d"] > 0

        if resume:  # saved at step 2, a new Trainer resumed from there: same weights as straight through
            assert {"tram_rank0.pt", "tram_rank1.pt"} <= set(r["checkpoint_files"])
            assert max_diff(r["resumed"], r["trainer"]) <= TOL
            # The resumed step 3 used the restored snapshot (theta_2), not a fresh start.
            resumed_d = training_logs(r["resumed_logs"])[-1]["tram/d"]
            assert resumed_d == pytest.approx(logs[2]["tram/d"], rel=1e-6) and resumed_d > 0


def test_training_arguments_carry_tram_settings():
    from transformers import HfArgumentParser

    from tram_dist import TRAMConfig
    from tram_dist.hf import TRAMTrainingArguments

    (args,) = HfArgumentParser(TRAMTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "unused", "--tram_target", "previous", "--tram_scale", "100", "--tram_rho_max", "1.0",
         "--tram_geometry", "sam"])
    assert args.tram_config() == TRAMConfig(geometry="sam", target="previous", scale=100.0, rho_max=1.0)
    (args,) = HfArgumentParser(TRAMTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "unused", "--tram_scale", "auto", "--tram_auto_steps", "5"])
    assert args.tram_config() == TRAMConfig(scale="auto", auto_steps=5)
    (args,) = HfArgumentParser(TRAMTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "unused", "--tram_target", "none", "--tram_rho", "0.05"])
    assert args.tram_config().target is None and args.tram_config().radius == 0.05
    assert not hasattr(args, "tram_max_grad_norm")  # the Trainer's max_grad_norm clips g'
    with pytest.raises(ValueError, match=r"TRAMConfig\.geometry must be one of \['sam', 'asam', 'fisher'\]"):
        TRAMTrainingArguments(output_dir="unused", tram_geometry="adam").tram_config()


def test_resume_without_tram_state_fails_before_training(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from tram_dist.hf import TRAMTrainer, TRAMTrainingArguments

    model = BertForSequenceClassification(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=1, intermediate_size=8))
    trainer = TRAMTrainer(model=model, args=TRAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                          train_dataset=[{"input_ids": torch.tensor([1, 2]), "labels": 0}])
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=.*checkpoint-2' has no TRAM state"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
