"""The one interface between TRAM and a sharding stack.

TRAM's math sees each rank's local pieces of theta and g as plain tensors, aligned element for
element. A backend says which tensors those are, where a new value must be written so that the
next forward really uses it, how theta comes back, and which process group carries the one
packed all-reduce of a step. No other module of tram_dist branches on the stack.
"""
from __future__ import annotations

import abc
import contextlib
import os
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


class Backend(abc.ABC):
    """A sharding stack as TRAM sees it: its capabilities (class attributes), then its methods in
    five groups: the modules each forward calls, this rank's pieces of theta and g, the passes,
    the update, and the lifecycle (validation and checkpoints). Torch-native stacks share
    TensorBackend's implementations; DeepSpeed drives its engine (backends/deepspeed.py).

    norm_weight is 1.0 where this rank's local partial sums count toward the global norm and
    0.0 on a replica of pieces another rank already counts (DDP, NO_SHARD, the replicas of
    HSDP, ZeRO-0): the global sums then come out of the same world-wide all-reduce that
    averages the divergence over every rank's data.
    """

    name = "base"
    # -- capabilities --------------------------------------------------------------------------
    # Backends whose parameters are replicated can hold a different perturbation on every rank.
    supports_rank_scope = False
    # mode="micro": gradients readable after every micro-batch (stash_grads, unstash_grads).
    supports_micro_mode = True
    # Whether a caller may take the base optimizer step itself (TRAM.step(update=False)).
    caller_may_update = True
    # Whether every rank must pass the same number of micro-batches to a step (sharded stacks).
    counts_must_agree = False

    def __init__(self, model: nn.Module, optimizer, group=None):
        self.model = model
        self.optimizer = optimizer
        self.group = group
        self.world_size = dist.get_world_size(group) if _distributed() else 1
        self.rank = dist.get_rank(group) if _distributed() else 0
        self.norm_weight = 1.0
        self._count_group = None

    # -- the modules -----------------------------------------------------------------------
    @property
    def forward_module(self) -> nn.Module:
        """The module the two gradient passes call."""
        return self.model

    @property
    def target_module(self) -> nn.Module:
        """The module a no-grad target forward calls (the same weights, no gradient hooks needed)."""
        return self.model

    @property
    def inner_module(self) -> nn.Module:
        """The user's model under any wrapper, for finding the input-embedding layer."""
        return self.model

    def target_forward(self):
        """Context around a no-grad target forward that runs between a pass's forward and backward."""
        return contextlib.nullcontext()

    # -- the local pieces --------------------------------------------------------------------
    @abc.abstractmethod
    def local_params(self) -> list[Tensor]:
        """This rank's pieces of theta (fp32 master where the stack keeps one)."""

    @abc.abstractmethod
    def local_grads(self) -> list[Optional[Tensor]]:
        """The reduced gradient on the same pieces; None where a piece has none."""

    @abc.abstractmethod
    def write(self, fill: Callable[[int, Tensor], object]) -> None:
        """Give every local piece a new value in the tensors the next forward uses: fill(i, target)
        writes piece i's value into target, which may be local_params()[i] itself (fill reads each
        entry before writing it). The first write after theta keeps what restore needs (at most
        one shard-sized copy)."""

    def load(self, values: Sequence[Tensor]) -> None:
        """Write one given value per local piece (a snapshot target), as ``write`` does."""
        if len(values) != len(self.local_params()):
            raise ValueError(f"load: {len(values)} values for {len(self.local_params())} local pieces")
        self.write(lambda i, target: target.copy_(values[i]))

    @abc.abstractmethod
    def restore(self) -> None:
        """Put theta back, exactly, into the tensors the forward uses. No-op when nothing was loaded."""

    @abc.abstractmethod
    def is_loaded(self) -> bool:
        """True while the forward's tensors hold something other than theta (theta + e, a snapshot)."""

    # -- the passes --------------------------------------------------------------------------
    def micro_batch(self, index: int, num_micro: int, sync: bool = True):
        """Context around the forward and backward of micro-batch ``index`` of ``num_micro`` in one
        pass: where gradient reduction can wait for the last one, it waits. ``sync=False`` keeps
        this rank's gradient local (scope "rank"; only where the backend allows it)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def backward(self, loss: Tensor, num_micro: int) -> None:
        """Backward of one micro-batch's mean loss; gradients add up to the mean over the step."""

    def all_reduce(self, packed: Tensor) -> Tensor:
        """SUM one packed tensor over every data-parallel rank: the step's only added collective."""
        if self.world_size > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        return packed

    def check_micro_batches(self, num_micro: int) -> None:
        """Raise ValueError, before any forward, when a step's micro-batch count cannot be served.

        On a sharded stack every micro-batch's forward gathers and its backward reduces, on every
        rank: ranks that pass different counts to one step would wait on each other's collectives
        for good (FSDP2) or abort inside the transport (ZeRO). One 2-element all-reduce on the CPU
        (gloo), before the step's first collective, finds that on every rank alike; no device sync."""
        if not self.counts_must_agree or self.world_size == 1:
            return
        if self._count_group is None:
            self._count_group = _cpu_group(self.group)
        device = "cpu" if dist.get_backend(self._count_group) == "gloo" else torch.device(
            torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        counts = torch.tensor([num_micro, -num_micro], dtype=torch.int64, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=self._count_group)
        if not torch.equal(counts[0], -counts[1]):  # a CPU tensor: no device read
            raise ValueError(f"tram.step: the ranks passed different numbers of micro-batches to one step (from "
                             f"{-int(counts[1])} to {int(counts[0])}); on the {self.name} backend every rank must pass "
                             "the same number (shard the data evenly, e.g. DistributedSampler with drop_last=True)")

    # -- the update --------------------------------------------------------------------------
    @abc.abstractmethod
    def grad_scale(self) -> float:
        """The loss scale the gradients carry (1 without fp16 loss scaling)."""

    @abc.abstractmethod
    def update_may_skip(self) -> bool:
        """Whether step() may skip the update (loss-scale overflow)."""

    @abc.abstractmethod
    def skip(self) -> None:
        """A step skipped before the update (non-finite pass 1): drop the gradients and, under
        loss scaling, back the scale off as an overflow would."""

    @abc.abstractmethod
    def zero_grad(self) -> None:
        """Drop the accumulated gradients."""

    @abc.abstractmethod
    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the gradient to a global norm of max_norm with the stack's own clipping; return the
        norm before clipping (the same on every rank). Under loss scaling, unscale first."""

    @abc.abstractmethod
    def prepare_step(self) -> None:
        """Make local_params() hold theta again before the update (and the snapshot refresh)."""

    @abc.abstractmethod
    def step(self) -> bool:
        """The base optimizer step with the gradient taken at theta + e; False if it was skipped
        (a loss-scale overflow: the update is skipped on every rank alike and the scale backs off)."""

    def stash_grads(self) -> list[Optional[Tensor]]:
        """Take the accumulated gradients out (mode "micro": g' of the earlier micro-batches)."""
        raise NotImplementedError(f"the {self.name} backend does not support mode='micro'")

    def unstash_grads(self, stash: list[Optional[Tensor]]) -> None:
        """Add stashed gradients back onto the accumulated ones."""
        raise NotImplementedError(f"the {self.name} backend does not support mode='micro'")

    # -- the lifecycle -----------------------------------------------------------------------
    def validate(self, config) -> None:
        """Raise ValueError for a stack configuration TRAM cannot serve, before any collective."""
        if config.scope == "rank" and not self.supports_rank_scope:
            raise ValueError(f"TRAMConfig.scope='rank' needs parameters replicated on every rank (local, DDP); "
                             f"the {self.name} backend shards them, so all ranks share one perturbation")
        if config.mode == "micro" and not self.supports_micro_mode:
            raise ValueError(f"TRAMConfig.mode='micro' is not supported on the {self.name} backend; use mode='global'")

    def save_checkpoint(self, directory: str, tag: str, step: int) -> None:
        """Model and optimizer state with TRAM's step count, each rank its own files; then `latest`,
        from rank 0, once every rank is done (a tag is named only when it is complete)."""
        from ..checkpoint import write_latest

        self._save(directory, tag, step)
        if self.world_size > 1:
            dist.barrier(group=self.group)
        if self.rank == 0:
            write_latest(directory, tag)

    @abc.abstractmethod
    def _save(self, directory: str, tag: str, step: int) -> None:
        """This rank's part of the model and optimizer state, with TRAM's step count, as ``tag``."""

    @abc.abstractmethod
    def load_checkpoint(self, directory: str, tag: str) -> Optional[int]:
        """Load the model and optimizer state; return the TRAM step count saved with it (None from
        a checkpoint written before it was recorded)."""


class TensorBackend(Backend):
    """Stacks whose forward reads the very tensors that hold theta (local, DDP, FSDP1, FSDP2), with
    torch's optimizer, clipping, loss scaler and torch.distributed.checkpoint.

    write fills those tensors in place and keeps one copy of the local pieces to restore.
    """

    def __init__(self, model: nn.Module, optimizer, group=None, scaler=None):
        super().__init__(model, optimizer, group)
        self.scaler = scaler  # a torch GradScaler / ShardedGradScaler (fp16)
        self._saved: Optional[list[Tensor]] = None
        _check_optimizer_tensors(model, optimizer)

    def _params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _local(self, t: Tensor) -> Tensor:
        """The plain local tensor behind a parameter or gradient (a DTensor's shard under FSDP2)."""
        return t

    def _settle(self) -> None:
        """Bring the parameters back to their sharded, between-passes form (FSDP2 needs it)."""

    # -- the local pieces --------------------------------------------------------------------
    def local_params(self) -> list[Tensor]:
        # .data, not .detach(): a write must not bump the parameter's autograd version, since a
        # target forward may run between a pass's forward and its backward (theta is restored bit
        # for bit before that backward runs).
        self._settle()
        return [self._local(p).data for p in self._params()]

    def local_grads(self) -> list[Optional[Tensor]]:
        return [None if p.grad is None else self._local(p.grad) for p in self._params()]

    @torch.no_grad()
    def write(self, fill: Callable[[int, Tensor], object]) -> None:
        pieces = self.local_params()
        if self._saved is None:
            self._saved = [piece.clone() for piece in pieces]
        for i, piece in enumerate(pieces):
            fill(i, piece)

    @torch.no_grad()
    def restore(self) -> None:
        if self._saved is None:
            return
        for piece, theta in zip(self.local_params(), self._saved, strict=True):
            piece.copy_(theta)
        self._saved = None

    def is_loaded(self) -> bool:
        return self._saved is not None

    # -- the passes --------------------------------------------------------------------------
    def backward(self, loss: Tensor, num_micro: int) -> None:
        loss = loss / num_micro
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    # -- the update --------------------------------------------------------------------------
    def grad_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def update_may_skip(self) -> bool:
        return self.scaler is not None

    def skip(self) -> None:
        self.zero_grad()
        if self.scaler is not None:
            self.scaler.update(new_scale=self.scaler.get_scale() * self.scaler.get_backoff_factor())

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def clip_grad_norm(self, max_norm: float) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        return self._clip(max_norm)

    def _clip(self, max_norm: float) -> float:
        """The stack's own clipping of the (unscaled) gradient; torch's, over DTensors on FSDP2."""
        return float(torch.nn.utils.clip_grad_norm_(self._params(), max_norm))

    def prepare_step(self) -> None:
        self.restore()

    def step(self) -> bool:
        applied = True
        if self.scaler is not None:
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            applied = self.scaler.get_scale() >= before
        else:
            self.optimizer.step()
        self.zero_grad()
        return applied

    def stash_grads(self) -> list[Optional[Tensor]]:
        grads = [None if p.grad is None else p.grad.detach().clone() for p in self._params()]
        self.zero_grad()
        return grads

    @torch.no_grad()
    def unstash_grads(self, stash: list[Optional[Tensor]]) -> None:
        for p, g in zip(self._params(), stash, strict=True):
            if g is not None:
                p.grad.add_(g)

    # -- the lifecycle -----------------------------------------------------------------------
    def validate(self, config) -> None:
        if self.scaler is None and self._computes_in_fp16():
            raise ValueError("scaler: the model computes in float16, which needs loss scaling: pass "
                             "scaler=torch.amp.GradScaler() (FSDP: ShardedGradScaler()) to TRAM")
        super().validate(config)

    def _computes_in_fp16(self) -> bool:
        if any(p.dtype == torch.float16 for p in self.model.parameters()):
            return True
        mp = getattr(self.model, "mixed_precision", None)  # FSDP1
        return getattr(mp, "param_dtype", None) == torch.float16

    def _save(self, directory: str, tag: str, step: int) -> None:
        # torch.distributed.checkpoint: each rank writes its shards.
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dcp_state() | {"tram": {"step": step}}, checkpoint_id=os.path.join(directory, tag))

    def load_checkpoint(self, directory: str, tag: str) -> Optional[int]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        path = os.path.join(directory, tag)
        state = self._dcp_state()
        recorded = "tram.step" in dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        if recorded:
            state["tram"] = {"step": -1}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        return state["tram"]["step"] if recorded else None

    def _dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.model),
                "optim": get_optimizer_state_dict(self.model, self.optimizer)}


def _check_optimizer_tensors(model: nn.Module, optimizer) -> None:
    """The base optimizer must step the model's own parameters: one built over another copy of the
    model, or before an FSDP1 wrap with use_orig_params=False (which replaces the parameters with
    flat ones), would return metrics while the weights never change."""
    owned = {id(p) for p in model.parameters()}
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = sum(id(p) not in owned for p in tensors)
    if foreign:
        raise ValueError(f"optimizer: {foreign} of the base optimizer's {len(tensors)} tensors are not parameters of "
                         f"the {type(model).__name__} TRAM wraps, so the update would never reach the model. Build "
                         "the optimizer from the wrapped model's parameters(), after wrapping (FSDP1 with "
                         "use_orig_params=False replaces the parameters with flat ones)")


def _cpu_group(group):
    """A gloo group over the same ranks, for a check that must not sync a device: the group itself
    where it is gloo; a new one where the group spans every process (all of them build TRAM, so all
    call new_group); else the group itself (its check then reads one value from the device)."""
    if dist.get_backend(group) == "gloo":
        return group
    if dist.get_world_size(group) == dist.get_world_size():
        return dist.new_group(backend="gloo")
    return group


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
