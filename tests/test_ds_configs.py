"""Every ready ZeRO config in ds_configs/ trains with TRAM on 2 ranks through a real engine.

Their "auto" values are filled as the HF Trainer fills them (tests/stacks.engine_from_config),
with 2 micro-batches per step (gradient_accumulation_steps=2).
"""
from __future__ import annotations

import glob
import math
import os

import pytest

from launcher import torchrun
from machine import needs_deepspeed_fp16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "ds_configs", "zero*.json")))


def test_the_ready_configs_are_all_there():
    assert CONFIGS == sorted(f"zero{s}_{d}.json" for s in ("1", "2", "3", "3_offload") for d in ("bf16", "fp16"))


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_deepspeed_fp16 if "fp16" in n else ()) for n in CONFIGS])
def test_config_trains_with_tram(tmp_path, name):
    results = torchrun(tmp_path, "--stack", "zero3", "--ds-config", os.path.join(ROOT, "ds_configs", name))
    stage = int(name[4])
    for res in results:
        assert res["stage"] == stage and res["fp16"] == name.endswith("fp16.json") and res["bf16"] == name.endswith("bf16.json")
        for m in res["metrics"]:
            assert m["skipped"] == 0.0 and math.isfinite(m["loss"]) and m["d"] > 0 and m["e_norm"] > 0, m
            assert m["scale"] == (65536.0 if res["fp16"] else 1.0)
        moved = max((res["state"][k] - res["start"][k]).abs().max().item() for k in res["start"])
        assert moved > 1e-4, f"{name}: the weights did not move"
    assert [m["d"] for m in results[0]["metrics"]] == [m["d"] for m in results[1]["metrics"]]  # one global radius
