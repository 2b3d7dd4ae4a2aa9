"""Checkpoint guards on one process (the distributed resume is in test_parity.py)."""
from __future__ import annotations

import pytest
import torch

from launcher import torchrun
from reference import reference_run
from tiny import LR, METHODS, make_batches, make_model

from tram_dist import TRAM, TRAMConfig, load_checkpoint, save_checkpoint


def _tram(method="tram_previous"):
    model = make_model(0)
    return model, TRAM(model, torch.optim.AdamW(model.parameters(), lr=LR), TRAMConfig(**METHODS[method]))


def test_local_resume_round_trip(tmp_path):
    batches = make_batches(4)
    model, tram = _tram()
    for b in batches:
        tram.step(b)
    straight = {k: v.clone() for k, v in model.state_dict().items()}
    model, tram = _tram()
    for b in batches[:2]:
        tram.step(b)
    save_checkpoint(tram, str(tmp_path))
    model, tram = _tram()
    assert load_checkpoint(tram, str(tmp_path)) == "step2" and tram.step_count == 2
    for b in batches[2:]:
        tram.step(b)
    for k, v in model.state_dict().items():
        assert torch.equal(v, straight[k]), k


def test_saving_between_ascent_and_descent_is_refused(tmp_path):
    model, tram = _tram("sam")
    batch = make_batches(1)[0]
    loss, logits = model(**batch)
    loss.backward()
    tram.observe(batch, logits, loss=loss)
    tram.ascent_step()  # the weights now hold theta + e
    with pytest.raises(ValueError, match="theta \\+ e"):
        save_checkpoint(tram, str(tmp_path))
    assert not any(tmp_path.iterdir()), "nothing may be written"


def test_load_without_a_complete_checkpoint_is_refused(tmp_path):
    _, tram = _tram()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        load_checkpoint(tram, str(tmp_path))
    # a save killed before `latest` was written: the tag directory exists, latest does not
    (tmp_path / "step9").mkdir()
    (tmp_path / "step9" / "tram_rank0.pt").write_bytes(b"half")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        load_checkpoint(tram, str(tmp_path))


def test_resume_with_other_settings_is_refused(tmp_path):
    _, tram = _tram()
    tram.step(make_batches(1)[0])
    save_checkpoint(tram, str(tmp_path))
    model = make_model(0)
    other = TRAM(model, torch.optim.AdamW(model.parameters(), lr=LR), TRAMConfig(**dict(METHODS["tram_previous"], scale=1.0)))
    with pytest.raises(ValueError, match="TRAMConfig differs"):
        load_checkpoint(other, str(tmp_path))


@pytest.mark.parametrize("stack", ["ddp", "zero3"])
def test_killed_rank_restarts_from_the_last_complete_checkpoint(tmp_path, stack):
    """torchrun --max-restarts: rank 1 is SIGKILLed inside the save of step 4 (its TRAM file
    written, the stack's checkpoint and `latest` not). The restarted job loads step 2, the last
    complete checkpoint, never the half-written step 4, and finishes at the 6-step reference."""
    ckpt = tmp_path / "ckpt"
    # The worker keys its process group by attempt (stacks.init_process_group): without that,
    # the restarted ranks raced the dead attempt's gloo addresses in the agent's store.
    results = torchrun(tmp_path / "out", "--stack", stack, "--fault", "--methods", "tram_previous",
                       "--steps", "6", "--ckpt", str(ckpt), max_restarts=1)
    ref_state, _ = reference_run(METHODS["tram_previous"], 6)
    for rank, res in enumerate(results):
        assert res["attempt"] == 1 and res["resumed_from"] == "step2", (rank, res["attempt"], res["resumed_from"])
        diff = max((res["tram_previous"]["state"][k] - v).abs().max().item() for k, v in ref_state.items())
        assert diff <= 1e-6, f"rank {rank}: off by {diff:.3g}"
    assert (ckpt / "latest").read_text() == "step6"
