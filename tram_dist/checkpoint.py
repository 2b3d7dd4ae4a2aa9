"""Checkpoint and resume with each stack's own machinery, plus TRAM's own per-rank state.

    save_checkpoint(tram, "ckpt")          # between steps, on every rank
    load_checkpoint(tram, "ckpt")          # fresh processes, same world size and sharding

Layout of ``directory``:
  TAG/                 the stack's checkpoint (DeepSpeed's save_checkpoint, or
                       torch.distributed.checkpoint for local, DDP, FSDP1, FSDP2)
  TAG/tram_rank{r}.pt  TRAM's state on rank r: counters, the noise generator, this rank's
                       shards of the target snapshot, TRAM-Fisher's carried KL
  latest               the tag of the last COMPLETE checkpoint, written last (by DeepSpeed, or
                       by rank 0 after a barrier, atomically): a save killed half-way is never
                       found by load_checkpoint, which reads this file.
A checkpoint never holds perturbed weights: saving between ascent_step and descent_step raises.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

LATEST = "latest"


def save_checkpoint(tram, directory: str, tag: Optional[str] = None) -> str:
    """Save the stack's model and optimizer state and TRAM's state under directory/tag; returns tag."""
    tag = tag or f"step{tram.step_count}"
    state = tram.state_dict()  # raises mid-step, before anything is written
    path = os.path.join(directory, tag)
    os.makedirs(path, exist_ok=True)
    atomic_save(state, os.path.join(path, f"tram_rank{tram.backend.rank}.pt"))
    tram.backend.save_checkpoint(directory, tag)  # writes `latest` last
    return tag


def load_checkpoint(tram, directory: str, tag: Optional[str] = None) -> str:
    """Load directory/tag (default: the tag in directory/latest) into the stack and TRAM; returns tag."""
    if tag is None:
        latest = os.path.join(directory, LATEST)
        if not os.path.isfile(latest):
            raise ValueError(f"load_checkpoint: {directory!r} holds no complete checkpoint (no {LATEST!r} file)")
        with open(latest) as f:
            tag = f.read().strip()
    path = os.path.join(directory, tag, f"tram_rank{tram.backend.rank}.pt")
    if not os.path.isfile(path):
        raise ValueError(f"load_checkpoint: {path!r} is missing: the checkpoint was written by a different "
                         "number of ranks, or not by tram_dist.save_checkpoint")
    state = torch.load(path, weights_only=False)
    tram.backend.load_checkpoint(directory, tag)
    tram.load_state_dict(state)
    return tag


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
