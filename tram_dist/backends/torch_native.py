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

    def __init__(self, model: nn.Module, optimizer, group=None):
        super().__init__(model, optimizer, group=None)
        self.world_size, self.rank = 1, 0


class DDPBackend(TensorBackend):
    """DistributedDataParallel: full parameters on every rank, gradients already averaged.

    The norm is the same on every rank, so only rank 0's sums count (norm_weight); the packed
    all-reduce still runs on every rank because the divergence is averaged over all ranks' data.
    """

    name = "ddp"
    supports_rank_scope = True

    def __init__(self, model: nn.Module, optimizer, group=None):
        super().__init__(model, optimizer, group if group is not None else model.process_group)
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

    def __init__(self, model: nn.Module, optimizer, group=None):
        from torch.distributed.fsdp import ShardingStrategy

        super().__init__(model, optimizer, group)
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

    def __init__(self, model: nn.Module, optimizer, group=None):
        super().__init__(model, optimizer, group)
        mesh = _first_mesh(model)
        if mesh is not None and mesh.ndim == 2:
            self.norm_weight = 1.0 if mesh.get_local_rank(0) == 0 else 0.0
        elif mesh is not None and mesh.ndim != 1:
            raise ValueError(f"FSDP2 mesh with {mesh.ndim} dims: tram_dist supports 1-D (shard) and 2-D (replicate, shard)")

    def _local(self, t: Tensor) -> Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    def _settle(self) -> None:
        # A no-grad forward leaves the root (reshard_after_forward=False) unsharded, and then
        # model.parameters() are the full tensors. reshard() is local: it frees them, no collective.
        from torch.distributed.fsdp import FSDPModule

        for m in self.model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def _first_mesh(model: nn.Module):
    for p in model.parameters():
        if hasattr(p, "device_mesh"):
            return p.device_mesh
    return None
