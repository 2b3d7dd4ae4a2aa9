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


@pytest.mark.parametrize("method,saved_at", [("tram_previous", 2), ("tram_auto", 1)])
def test_local_resume_round_trip(tmp_path, method, saved_at):
    """tram_auto is saved half-way through its 2 calibration steps: the resumed run fixes the same scale."""
    batches = make_batches(4)
    model, tram = _tram(method)
    straight_metrics = [tram.step(b) for b in batches]
    straight = {k: v.clone() for k, v in model.state_dict().items()}
    model, tram = _tram(method)
    for b in batches[:saved_at]:
        tram.step(b)
    save_checkpoint(tram, str(tmp_path))
    model, tram = _tram(method)
    assert load_checkpoint(tram, str(tmp_path)) == f"step{saved_at}" and tram.step_count == saved_at
    resumed_metrics = [tram.step(b) for b in batches[saved_at:]]
    for k, v in model.state_dict().items():
        assert torch.equal(v, straight[k]), k
    assert [m["kl_scale"] for m in resumed_metrics] == [m["kl_scale"] for m in straight_metrics[saved_at:]]


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


def test_reused_tag_whose_save_died_is_refused_not_mixed(tmp_path):
    """A tag saved at step 2, reused at step 4 by a save that dies after TRAM's file but before
    the model's: `latest` still names the tag, which now holds two steps' states. Loading it
    raises, naming the file; a save that completes under the reused tag loads as usual."""
    batches = make_batches(4)
    _, tram = _tram()
    for b in batches[:2]:
        tram.step(b)
    save_checkpoint(tram, str(tmp_path), tag="last")
    for b in batches[2:]:
        tram.step(b)

    def dies(directory, tag, step):
        raise KeyboardInterrupt("killed")

    complete_save, tram.backend.save_checkpoint = tram.backend.save_checkpoint, dies
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tram, str(tmp_path), tag="last")
    _, fresh = _tram()
    with pytest.raises(ValueError, match=r"mixes two saves: '.*last/tram_rank0\.pt' holds TRAM's state after step 4, "
                                         r"the local checkpoint the model after step 2"):
        load_checkpoint(fresh, str(tmp_path))
    tram.backend.save_checkpoint = complete_save
    save_checkpoint(tram, str(tmp_path), tag="last")
    _, fresh = _tram()
    assert load_checkpoint(fresh, str(tmp_path)) == "last" and fresh.step_count == 4


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), r"cannot be read as TRAM's state \(truncated or not written by "
                                                   r"tram_dist\)"),
    (lambda p: torch.save({"model": 1}, p), r"is not TRAM's state: it holds \['model'\]"),
])
def test_truncated_or_foreign_state_file_is_named(tmp_path, damage, message):
    _, tram = _tram()
    tram.step(make_batches(1)[0])
    save_checkpoint(tram, str(tmp_path))
    damage(tmp_path / "step1" / "tram_rank0.pt")
    _, fresh = _tram()
    with pytest.raises(ValueError, match=r"load_checkpoint: '.*step1/tram_rank0\.pt' " + message):
        load_checkpoint(fresh, str(tmp_path))
