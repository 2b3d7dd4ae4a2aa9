"""Choose the backend once, from the type of the wrapped model or engine."""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from .base import Backend
from .torch_native import DDPBackend, FSDP1Backend, FSDP2Backend, LocalBackend

__all__ = ["Backend", "make_backend"]


def make_backend(model, optimizer=None, group=None, scaler=None) -> Backend:
    """The backend for ``model``: a DeepSpeed engine, DDP, FSDP1, FSDP2, or a plain module; ``scaler``
    is the torch GradScaler (FSDP: ShardedGradScaler) of an fp16 run."""
    if _is_deepspeed_engine(model):
        from .deepspeed import make_deepspeed_backend

        if optimizer is not None:
            raise ValueError("optimizer: pass None with a DeepSpeed engine; the engine owns its optimizer "
                             "(TRAM drives the engine around it)")
        if scaler is not None:
            raise ValueError("scaler: pass None with a DeepSpeed engine; it scales the loss itself (the fp16 "
                             "block of its config)")
        return make_deepspeed_backend(model, group)
    if optimizer is None:
        raise ValueError("optimizer: a torch optimizer over the model's parameters is required "
                         "unless the model is a DeepSpeed engine")
    from torch.nn.parallel import DistributedDataParallel
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, DistributedDataParallel):
        return DDPBackend(model, optimizer, group, scaler)
    if isinstance(model, FullyShardedDataParallel):
        return FSDP1Backend(model, optimizer, group, scaler)
    if _is_fsdp2(model):
        return FSDP2Backend(model, optimizer, group, scaler)
    if isinstance(model, nn.Module):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            raise ValueError(f"model: a plain {type(model).__name__} while a process group of "
                             f"{dist.get_world_size(group)} ranks exists: each rank would train alone and the "
                             "replicas drift apart. Pass the wrapped model (DistributedDataParallel, FSDP, "
                             "fully_shard, a DeepSpeed engine), or group=<a one-rank group> for a per-rank run")
        return LocalBackend(model, optimizer, scaler=scaler)
    raise ValueError(f"model: expected an nn.Module, DDP, FSDP or a DeepSpeed engine, got {type(model).__name__}")


def _is_deepspeed_engine(model) -> bool:
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def _is_fsdp2(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
