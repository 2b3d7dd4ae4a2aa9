"""How the tests build each stack on CPU: process groups, wrapping, full weights, collective counts.

This is test scaffolding written against the torch / DeepSpeed APIs directly; it does not call
tram_dist, so the reference comparison stays independent of the code under test.
"""
from __future__ import annotations

import collections
import importlib
import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


CLIP = 0.05  # small enough that every step of the tiny model clips


def init_process_group(backend: str = "gloo") -> None:
    """init_process_group, keyed by the torchrun attempt when the agent's store is reused.

    Under torchrun's c10d rendezvous the workers share the agent's TCPStore across restarts
    (torch creates no per-attempt prefix there), so a restarted rank can read the dead attempt's
    gloo addresses and fail with "Connection refused" (seen under load). A PrefixStore per
    attempt gives every attempt fresh keys."""
    import os
    from datetime import timedelta

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend)
        return
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=timedelta(minutes=5))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"/tram_attempt_{attempt}", store),
                            rank=rank, world_size=world)


def skip_deepspeed_shm_build() -> None:
    """Skip the ~100 s JIT build of a shared-memory op only inference_all_reduce uses (built on a
    fresh machine at DeepSpeed's first init_distributed); call it before. A plain `import
    deepspeed.comm.torch as m` would bind the wrong module."""
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_distributed(stack: str) -> None:
    if stack.startswith("zero"):
        skip_deepspeed_shm_build()
        import deepspeed

        init_process_group("gloo")
        deepspeed.init_distributed(dist_backend="gloo")  # adopts the process group above
    else:
        init_process_group("gloo")


def make_scaler(stack: str):
    """The loss scaler a user of the stack would pick (2^16 start, backoff 0.5)."""
    if stack.startswith("fsdp"):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device="cpu", init_scale=2.0 ** 16)
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)


def make_optimizer(params, lr: float, optim: str = "adamw"):
    return torch.optim.AdamW(params, lr=lr) if optim == "adamw" else torch.optim.SGD(params, lr=lr)


def wrap(stack: str, variant: str, model: nn.Module, lr: float, dtype: str = "fp32", optim: str = "adamw",
         micro: int = 1):
    """(wrapped model or engine, base optimizer or None) for one stack and variant."""
    if stack == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if dtype == "bf16":  # fp32 parameters, bf16 compute: the usual way to run DDP in bf16
            model.forward = _autocast_bf16(model.forward)
        ddp = DistributedDataParallel(model)
        return ddp, make_optimizer(ddp.parameters(), lr, optim)
    if stack == "fsdp1":
        return _fsdp1(model, variant, lr, optim, dtype)
    if stack == "fsdp2":
        return _fsdp2(model, variant, lr, dtype, optim)
    if stack.startswith("zero"):
        return _deepspeed(model, int(stack[-1]), variant, lr, dtype, optim, micro), None
    raise ValueError(stack)


def _autocast_bf16(forward):
    def run(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    return run


def _fsdp1(model, variant, lr, optim, dtype="fp32"):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

    strategy, orig = variant.split(",")
    kwargs = dict(device_id=torch.device("cpu"), use_orig_params=(orig == "orig"),
                  sharding_strategy=ShardingStrategy[strategy])
    if dtype == "bf16":
        from torch.distributed.fsdp import MixedPrecision

        kwargs["mixed_precision"] = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if strategy == "HYBRID_SHARD":
        # One replica of a 2-rank shard group. A (2, 1) mesh would test the replica logic, but
        # FSDP1 then does not average gradients across the replicas on gloo (the plain-gradient
        # check catches it); FSDP2's HSDP runs on (2, 1) instead.
        kwargs["device_mesh"] = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
    model.fc1 = FSDP(model.fc1, **kwargs)
    fsdp = FSDP(model, **kwargs)
    return fsdp, make_optimizer(fsdp.parameters(), lr, optim)


def _fsdp2(model, variant, lr, dtype, optim):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if variant == "hsdp":
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bf16" else MixedPrecisionPolicy()
    fully_shard(model.fc1, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model, make_optimizer(model.parameters(), lr, optim)


def _deepspeed(model, stage, variant, lr, dtype, optim, micro=1):
    import deepspeed

    cfg = {
        "train_micro_batch_size_per_gpu": 4 // micro,
        "gradient_accumulation_steps": micro,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "initial_scale_power": 16, "hysteresis": 1},
    }
    if variant == "clip":  # an existing config's clipping must act on the descent gradient
        cfg["gradient_clipping"] = CLIP
    if stage == 3 and variant != "default_threshold":
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    optimizer = make_optimizer(model.parameters(), lr, optim)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    return engine


def plain_grads(stack: str, wrapped) -> dict:
    """The full averaged gradient after one plain backward, by plain parameter names."""
    if stack == "fsdp1" and not wrapped._use_orig_params:
        return _flat_grads(wrapped)
    if stack == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(wrapped, with_grads=True, writeback=False):
            return {n.replace("_fsdp_wrapped_module.", ""): p.grad.detach().clone() for n, p in wrapped.named_parameters()}
    if stack == "fsdp2":
        return {n: p.grad.full_tensor().detach().clone() for n, p in wrapped.named_parameters()}
    if stack == "ddp":
        return {n: p.grad.detach().clone() for n, p in wrapped.module.named_parameters()}
    if stack.startswith("zero"):
        from deepspeed.utils import safe_get_full_grad

        return {n: safe_get_full_grad(p).detach().float().clone() for n, p in wrapped.module.named_parameters()}
    raise ValueError(stack)


def _flat_grads(wrapped) -> dict:
    """FSDP1 with use_orig_params=False (summon_full_params cannot give grads there): all-gather
    each unit's sharded FlatParameter grad and cut it up by the FlatParameter's own metadata."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out = {}
    for name, module in wrapped.named_modules():
        if not isinstance(module, FSDP) or module._handle is None:
            continue
        fp = module._handle.flat_param
        full = fp.grad
        if module._handle.uses_sharded_strategy:
            full = fp.grad.new_empty(fp.grad.numel() * dist.get_world_size())
            dist.all_gather_into_tensor(full, fp.grad.contiguous())
        sizes = list(fp._numels_with_padding)
        pieces = full[:sum(sizes)].split(sizes)  # drop the shard padding at the end
        prefix = name.replace("_fsdp_wrapped_module", "").strip(".")
        real = [p for p, pad in zip(pieces, fp._is_padding_mask) if not pad]
        for fqn, shape, piece in zip(fp._fqns, fp._shapes, real):
            out[f"{prefix}.{fqn}".strip(".")] = piece.view(shape).clone()
    return out


def full_state(stack: str, wrapped) -> dict:
    """The full (unsharded) weights by their plain names, on every rank."""
    if stack == "ddp":
        return {k: v.detach().clone() for k, v in wrapped.module.state_dict().items()}
    if stack == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(wrapped, writeback=False):
            return {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                    for n, p in wrapped.named_parameters()}
    if stack == "fsdp2":
        return {n: p.full_tensor().detach().clone() for n, p in wrapped.named_parameters()}
    if stack.startswith("zero"):
        # The fp32 masters (a collective per parameter, in the same order on every rank), not
        # the bf16 weights the forward uses, which are rounded to 8 bits of mantissa.
        from deepspeed.utils import safe_get_full_fp32_param

        if wrapped.zero_optimization_stage() == 0 and not wrapped.bfloat16_enabled():
            return {n: p.detach().clone() for n, p in wrapped.module.named_parameters()}  # no masters
        if wrapped.zero_optimization_stage() == 0:  # bf16: the unfused optimizer's fp32 copies
            opt = wrapped.optimizer
            master = {id(p): m for ps, ms in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(ps, ms)}
            return {n: master[id(p)].detach().clone() for n, p in wrapped.module.named_parameters()}
        return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in wrapped.module.named_parameters()}
    raise ValueError(stack)


class CollectiveCounter(TorchDispatchMode):
    """Counts the collectives this thread issues, by name (c10d::allreduce_, ...), and the
    elements of the largest tensor each carries (an all-gather's output, a reduce-scatter's input;
    0 for ops on tensor lists, such as all_reduce's).

    A dispatch mode sees every c10d op, DDP's C++ reducer's from the autograd engine included
    (on CPU the backward runs on the calling thread), at a small cost per op.
    """

    def __enter__(self):
        self._counts, self._elements = collections.Counter(), collections.Counter()
        return super().__enter__()

    def __exit__(self, *exc):
        self.counts, self.elements = dict(self._counts), dict(self._elements)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("c10d::"):
            self._counts[name] += 1
            self._elements[name] += max((a.numel() for a in args if isinstance(a, torch.Tensor)), default=0)
        return func(*args, **(kwargs or {}))


def two_pass_step(stack: str, wrapped, optimizer, batch) -> None:
    """What any two-pass method must do: fwd+bwd, zero grads, fwd+bwd, step (no TRAM)."""
    for pass_index in range(2):
        loss, _ = wrapped(**batch)
        if stack.startswith("zero"):
            wrapped.backward(loss)
        else:
            loss.backward()
        if pass_index == 0:
            (wrapped.optimizer if stack.startswith("zero") else optimizer).zero_grad()
    if stack.startswith("zero"):
        wrapped.step()
    else:
        optimizer.step()
        optimizer.zero_grad()


def engine_from_config(model: nn.Module, path: str, micro: int, micro_batch: int):
    """A DeepSpeed engine from a ds_configs/ file, its "auto" values filled as the HF Trainer
    fills them (micro-batch size, accumulation, clipping 1.0, AdamW lr 1e-3, a 3-step schedule,
    the file's own precision), and three CPU-only adaptations: torch's AdamW instead of the fused
    or CPU-Adam ops DeepSpeed would compile, no pinned memory, and a torch optimizer allowed with
    offload."""
    import deepspeed

    with open(path) as f:
        cfg = json.load(f)
    filled = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": micro,
              "gradient_clipping": 1.0, "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
              "warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 1, "total_num_steps": 3,
              "enabled": True}

    def fill(node):
        if isinstance(node, dict):
            return {k: (filled[k] if v == "auto" else fill(v)) for k, v in node.items()}
        return node

    cfg = fill(cfg)
    cfg["optimizer"]["params"]["torch_adam"] = True
    zero = cfg["zero_optimization"]
    for key in ("offload_optimizer", "offload_param"):
        if key in zero:
            zero[key]["pin_memory"] = False
            cfg["zero_force_ds_cpu_optimizer"] = False
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine
