"""Checkpoint and resume with each stack's own machinery, plus TRAM's own per-rank state.

    save_checkpoint(tram, "ckpt")          # between steps, on every rank
    load_checkpoint(tram, "ckpt")          # fresh processes, same world size and sharding

Layout of ``directory``:
  TAG/                 the stack's checkpoint (DeepSpeed's save_checkpoint, or
                       torch.distributed.checkpoint for local, DDP, FSDP1, FSDP2)
  TAG/tram_rank{r}.pt  TRAM's state on rank r: counters, the noise generator, this rank's
                       shards of the target snapshot, TRAM-Fisher's carried KL
  latest               the tag of the last COMPLETE checkpoint, written last (by rank 0 after a
                       barrier, atomically): a save killed half-way is never found by
                       load_checkpoint, which reads this file.
The stack's checkpoint records TRAM's step count: a tag reused by a save that died half-way
holds two steps' states, and load_checkpoint raises instead of loading them together.
A checkpoint never holds perturbed weights: saving between ascent_step and descent_step raises.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

LATEST = "latest"
STATE_FILE = "tram_rank{rank}.pt"  # TRAM's state of one rank, next to the stack's checkpoint


def save_checkpoint(tram, directory: str, tag: Optional[str] = None) -> str:
    """Save the stack's model and optimizer state and TRAM's state under directory/tag; returns tag."""
    tag = tag or f"step{tram.step_count}"
    state = tram.state_dict()  # raises mid-step, before anything is written
    path = os.path.join(directory, tag)
    os.makedirs(path, exist_ok=True)
    atomic_save(state, os.path.join(path, STATE_FILE.format(rank=tram.backend.rank)))
    # The stack's checkpoint records TRAM's step too: a reused tag whose save died half-way then
    # holds two steps' states, and load_checkpoint says so instead of mixing them.
    tram.backend.save_checkpoint(directory, tag, tram.step_count)  # writes `latest` last
    return tag


def load_checkpoint(tram, directory: str, tag: Optional[str] = None) -> str:
    """Load directory/tag (default: the tag in directory/latest) into the stack and TRAM; returns tag."""
    if tag is None:
        latest = os.path.join(directory, LATEST)
        if not os.path.isfile(latest):
            raise ValueError(f"load_checkpoint: {directory!r} holds no complete checkpoint (no {LATEST!r} file)")
        with open(latest) as f:
            tag = f.read().strip()
    path = os.path.join(directory, tag, STATE_FILE.format(rank=tram.backend.rank))
    if not os.path.isfile(path):
        raise ValueError(f"load_checkpoint: {path!r} is missing: the checkpoint was written by a different "
                         "number of ranks, or not by tram_dist.save_checkpoint")
    state = read_state(path)
    step = tram.backend.load_checkpoint(directory, tag)
    if step is not None and step != state["step_count"]:
        raise ValueError(f"load_checkpoint: {os.path.join(directory, tag)!r} mixes two saves: {path!r} holds TRAM's "
                         f"state after step {state['step_count']}, the {tram.backend.name} checkpoint the model after "
                         f"step {step}. A save that reused the tag died half-way; load another tag "
                         "(load_checkpoint(tram, directory, tag=...)), and give each save its own tag")
    tram.load_state_dict(state)
    return tag


# What every TRAM state file holds (TRAM.state_dict).
STATE_KEYS = {"config", "step_count", "world_size", "rank", "generator", "snapshot", "partial", "local_numels"}


def read_state(path: str) -> dict:
    """TRAM's state file, or a ValueError naming it when it is truncated or not one."""
    try:
        state = torch.load(path, weights_only=False)
    except Exception as e:  # torch.load's errors for a cut-off or foreign file vary by format
        raise ValueError(f"load_checkpoint: {path!r} cannot be read as TRAM's state (truncated or not written by "
                         f"tram_dist): {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not STATE_KEYS <= set(state):
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"load_checkpoint: {path!r} is not TRAM's state: it holds {found}, TRAM's holds "
                         f"{sorted(STATE_KEYS)}")
    return state


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary name, then rename: a reader sees the old file or the whole new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_latest(directory: str, tag: str) -> None:
    tmp = os.path.join(directory, f".{LATEST}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag)
    os.replace(tmp, os.path.join(directory, LATEST))
