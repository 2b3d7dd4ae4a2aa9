"""Local, DDP, FSDP1 and FSDP2 backends: the forward reads the parameters' own local tensors."""
from __future__ import annotations

import contextlib

import torch.distributed as dist
from torch import Tensor, nn

from .base import TensorBackend


class LocalBackend(TensorBackend):
    """One process: every piece is a whole parameter; nothing to reduce."""

    name = "local"
    supports_rank_scope = True

    def __init__(self, model: nn.Module, optimizer, group=None, scaler=None):
        super().__init__(model, optimizer, None, scaler)
        self.world_size, self.rank = 1, 0


class DDPBackend(TensorBackend):
    """DistributedDataParallel: full parameters on every rank, gradients already averaged.

    The norm is the same on every rank, so only rank 0's sums count (norm_weight); the packed
    all-reduce still runs on every rank because the divergence is averaged over all ranks' data.
    """

    name = "ddp"
    supports_rank_scope = True

    def __init__(self, model: nn.Module, optimizer, group=None, scaler=None):
        super().__init__(model, optimizer, group if group is not None else model.process_group, scaler)
        self.norm_weight = 1.0 if self.rank == 0 else 0.0

    @property
    def target_module(self) -> nn.Module:
        # The inner module: a no-grad forward through DDP would broadcast buffers for nothing.
        return self.model.module

    def micro_batch(self, index: int, num_micro: int, sync: bool = True):
        # Accumulate locally and all-reduce once, with the last micro-batch's backward.
        return self.model.no_sync() if index < num_micro - 1 or not sync else contextlib.nullcontext()

    @property
    def inner_module(self) -> nn.Module:
        return self.model.module


class FSDP1Backend(TensorBackend):
    """FullyShardedDataParallel (FSDP1), with use_orig_params True or False.

    Outside forward, each parameter is this rank's 1-D slice (use_orig_params=True; empty on a
    rank that holds none of it) or a padded FlatParameter shard (False; the padding is zero in
    param and grad, so e is zero there). In-place edits of these shards reach the next
    all-gather. Under HYBRID_SHARD the replicas of a shard hold equal values: only replica 0
    counts toward the norm. NO_SHARD is DDP-like: only rank 0 counts.
    """

    name = "fsdp1"
    counts_must_agree = True

    def __init__(self, model: nn.Module, optimizer, group=None, scaler=None):
        from torch.distributed.fsdp import ShardingStrategy

        super().__init__(model, optimizer, group, scaler)
        _check_fsdp1_internals(model)
        strategy = model.sharding_strategy
        if strategy == ShardingStrategy.NO_SHARD:
            self.norm_weight = 1.0 if dist.get_rank(model.process_group) == 0 else 0.0
        elif strategy in (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2):
            replicate_group = model._inter_node_pg
            self.norm_weight = 1.0 if dist.get_rank(replicate_group) == 0 else 0.0

    @property
    def inner_module(self) -> nn.Module:
        return self.model.module

    def _settle(self) -> None:
        # The root unit keeps its unsharded FlatParameter after forward ("about to be used by
        # backward"), and the next forward then skips its all-gather: an edit of the local
        # shard would never be seen. Free every unsharded FlatParameter (local, no collective)
        # so the next forward all-gathers what TRAM wrote. FSDP1 has no public call for this.
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        for state in FSDP.fsdp_modules(self.model):
            handle = state._handle
            if handle is not None and handle.uses_sharded_strategy:
                handle.reshard(free_unsharded_flat_param=True)
                handle.post_reshard()
                handle._prefetched = False


    def _clip(self, max_norm: float) -> float:
        return float(self.model.clip_grad_norm_(max_norm))  # a collective over the shards


class FSDP2Backend(TensorBackend):
    """fully_shard (FSDP2): parameters and grads are DTensors sharded on dim 0.

    ``to_local()`` is this rank's rows (fewer on high ranks for uneven splits, possibly none);
    in-place edits of it reach the next all-gather. On a 2-D HSDP mesh (replicate, shard) only
    the replica with coordinate 0 counts toward the norm.
    """

    name = "fsdp2"
    counts_must_agree = True

    def __init__(self, model: nn.Module, optimizer, group=None, scaler=None):
        super().__init__(model, optimizer, group, scaler)
        mesh = _check_placements(model)
        if mesh.ndim == 2:
            self.norm_weight = 1.0 if mesh.get_local_rank(0) == 0 else 0.0

    def _local(self, t: Tensor) -> Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    def _settle(self) -> None:
        # A no-grad forward leaves the root (reshard_after_forward=False) unsharded, and then
        # model.parameters() are the full tensors. reshard() is local: it frees them, no collective.
        from torch.distributed.fsdp import FSDPModule

        for m in self.model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def _check_fsdp1_internals(model: nn.Module) -> None:
    """FSDP1 has no public call that frees an unsharded flat parameter (see _settle)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from ..versions import require

    handles = [getattr(state, "_handle", None) for state in FSDP.fsdp_modules(model)]
    require("torch", "FSDP1's per-module FlatParamHandle (state._handle)", any(h is not None for h in handles))
    for name in ("reshard", "post_reshard", "uses_sharded_strategy", "_prefetched"):
        require("torch", f"FlatParamHandle.{name}", all(h is None or hasattr(h, name) for h in handles))


def _check_placements(model: nn.Module):
    """The mesh of FSDP2's parameters, when each is laid out as FSDP2 alone lays it out: (Shard(0),)
    on a 1-D mesh, or (Replicate(), Shard(0)) on a 2-D HSDP mesh. Anything else (tensor or
    context parallelism on another mesh dimension) would make each rank's sum of squares count
    pieces other ranks also hold, or miss them: a wrong norm, so it is refused."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    allowed = ((Shard(0),), (Replicate(), Shard(0)))
    meshes = set()
    for name, p in model.named_parameters():
        layout = (f"placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh" if isinstance(p, DTensor)
                  else "a plain tensor, not sharded by fully_shard")
        if not isinstance(p, DTensor) or tuple(p.placements) not in allowed:
            raise ValueError(f"fully_shard: parameter {name!r} is {layout}; tram_dist supports FSDP2 alone: every "
                             "parameter sharded by fully_shard, (Shard(0),) on a 1-D mesh or (Replicate(), Shard(0)) "
                             "on a 2-D (replicate, shard) mesh (no tensor parallelism)")
        meshes.add(p.device_mesh)
    if len(meshes) != 1:
        raise ValueError(f"fully_shard: the parameters live on {len(meshes)} device meshes; tram_dist needs one")
    return meshes.pop()
