"""DeepSpeed ZeRO stages 0-3: TRAM drives the engine around its own optimizer.

TRAM cannot be the engine's client optimizer (under ZeRO it would only see flat fp32 master
partitions, never the bit16 weights the forward uses). Instead it reads each rank's pieces of
theta (the fp32 masters) and of the reduced gradient, and writes theta + e into the low-precision
tensors the next forward reads:

| stage        | theta piece                  | write target             | after writing           |
|--------------|------------------------------|--------------------------|-------------------------|
| 0, fp32      | the parameter itself         | the parameter            | - (one copy kept)       |
| 0, bf16      | optimizer.fp32_groups        | the bf16 parameter       | -                       |
| 1, 2         | p._hp_mapping.hp_fragment    | p's local bit16 fragment | all-gather bit16 groups |
| 3            | local fp32 master partition  | p.ds_tensor              | release gathered copies |

Where an fp32 master exists it already holds theta, so no copy is kept and restore rewrites the
write targets from the masters; engine.step() does the same after every applied update.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .base import Backend


class DeepSpeedBackend(Backend):
    """Engine plumbing common to every stage; subclasses list (theta, grad, write target) pieces."""

    # True where engine.step() rewrites the write targets from fp32 masters after an update.
    master_rewrites_on_step = True
    # Gradients are readable only at the engine's accumulation boundary, once per step.
    supports_micro_mode = False
    # The optimizer step is engine.step(), which TRAM calls after pass 2.
    caller_may_update = False
    counts_must_agree = True

    def __init__(self, engine, group=None):
        super().__init__(engine, engine.optimizer, group if group is not None else engine.data_parallel_group)
        self.engine = engine
        self.stage = engine.zero_optimization_stage()
        self.name = f"zero{self.stage}"
        self._loaded = False

    # forward_module is the engine (self.model): its forward and backward run the accumulation.

    @property
    def target_module(self) -> nn.Module:
        # The module itself: its ZeRO-3 hooks gather parameters; the engine's forward would add
        # its own step bookkeeping for a pass that takes no gradient.
        return self.engine.module

    @property
    def inner_module(self) -> nn.Module:
        return self.engine.module

    def validate(self, config) -> None:
        if self.engine.fp16_enabled() and self.stage == 0:
            raise ValueError("fp16.enabled: fp16 under DeepSpeed ZeRO stage 0 is not supported (its fused "
                             "FP16_Optimizer keeps its masters in another layout); use ZeRO 1-3, or bf16")
        super().validate(config)
        if config.max_grad_norm is not None:
            self.clip_grad_norm(config.max_grad_norm)  # raises: the engine's config owns clipping

    def clip_grad_norm(self, max_norm: float) -> float:
        raise ValueError("TRAMConfig.max_grad_norm: under DeepSpeed set gradient_clipping in the DeepSpeed "
                         "config instead (the engine clips the descent gradient itself)")

    def check_micro_batches(self, num_micro: int) -> None:
        # One TRAM step is one DeepSpeed optimizer step: the engine's gradient_accumulation_steps
        # micro-batches, or fewer for a short last window (an epoch's end, as the HF Trainer has).
        gas = self.engine.gradient_accumulation_steps()
        if num_micro > gas:
            raise ValueError(f"tram.step got {num_micro} micro-batch(es) but the DeepSpeed config has "
                             f"gradient_accumulation_steps={gas}: pass a list of at most {gas} micro-batches")
        super().check_micro_batches(num_micro)

    def micro_batch(self, index: int, num_micro: int, sync: bool = True):
        # Each pass is one accumulation window: DeepSpeed's documented override makes only the
        # last micro-batch's backward a boundary (the gradient reduction), and TRAM calls
        # engine.step() once, after pass 2. Gradients are read only after pass 1's boundary.
        self.engine.set_gradient_accumulation_boundary(index == num_micro - 1)
        return contextlib.nullcontext()

    # -- the pieces --------------------------------------------------------------------------
    def _pieces(self, grads: bool = False) -> list[tuple[Tensor, Optional[Tensor], Tensor]]:
        """(theta, grad, write target) for each local piece, aligned element for element.

        The grad is read only when asked: DeepSpeed allows it only between backward and step."""
        raise NotImplementedError

    def _sync(self) -> None:
        """Make what was written into the write targets visible to the next forward."""

    def local_params(self) -> list[Tensor]:
        return [theta for theta, _, _ in self._pieces()]

    def local_grads(self) -> list[Optional[Tensor]]:
        return [g for _, g, _ in self._pieces(grads=True)]

    @torch.no_grad()
    def write(self, fill: Callable[[int, Tensor], object]) -> None:
        for i, (_, _, target) in enumerate(self._pieces()):
            fill(i, target)
        self._sync()
        self._loaded = True

    @torch.no_grad()
    def restore(self) -> None:
        if not self._loaded:
            return
        for theta, _, target in self._pieces():
            target.copy_(theta)
        self._sync()
        self._loaded = False

    # -- checkpoints ---------------------------------------------------------------------------
    def is_loaded(self) -> bool:
        return self._loaded

    def _save(self, directory: str, tag: str, step: int) -> None:
        # `latest` is written by TRAM (Backend.save_checkpoint), after every rank's files: DeepSpeed's
        # own would name the tag before TRAM's state of another rank might be complete.
        self.engine.save_checkpoint(directory, tag=tag, client_state={"tram_step": step}, save_latest=False)

    def load_checkpoint(self, directory: str, tag: str) -> Optional[int]:
        path, client_state = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise ValueError(f"load_checkpoint: DeepSpeed could not load {directory!r} tag {tag!r}")
        return (client_state or {}).get("tram_step")

    # -- training ------------------------------------------------------------------------------
    def backward(self, loss: Tensor, num_micro: int) -> None:
        # Scale by this step's own micro-batch count (a short last window is not 1/gas).
        self.engine.backward(loss / num_micro, scale_wrt_gas=False)

    def zero_grad(self) -> None:
        # engine.zero_grad() only drops p.grad; the partitioned gradients live in the optimizer.
        self.engine.optimizer.zero_grad()

    def prepare_step(self) -> None:
        if not self.master_rewrites_on_step:
            self.restore()

    def step(self) -> bool:
        self.engine.step()
        if self.engine.was_step_applied():
            self._loaded = False  # the engine rewrote every write target from the masters
            return True
        self.restore()  # a skipped step leaves theta + e in the bit16 weights
        return False

    def grad_scale(self) -> float:
        # fp16: the gradient fragments carry DeepSpeed's dynamic loss scale until engine.step()
        return float(self.engine.optimizer.loss_scale) if self.engine.fp16_enabled() else 1.0

    def update_may_skip(self) -> bool:
        return self.engine.fp16_enabled()

    def skip(self) -> None:
        self.zero_grad()
        if self.engine.fp16_enabled():  # an overflow in pass 1: DeepSpeed's scaler backs off as usual
            self.engine.optimizer.loss_scaler.update_scale(True)


class Zero0Backend(DeepSpeedBackend):
    """Stage 0: full parameters and full averaged gradients on every rank (DDP-like)."""

    def __init__(self, engine, group=None):
        super().__init__(engine, group)
        self.norm_weight = 1.0 if self.rank == 0 else 0.0
        opt = engine.optimizer
        self._pairs = None
        if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):  # bf16: FP16_UnfusedOptimizer
            self._pairs = [(m, p) for ms, ps in zip(opt.fp32_groups, opt.fp16_groups) for m, p in zip(ms, ps)]
        else:  # fp32: the client optimizer steps the parameters themselves; keep one copy
            self.master_rewrites_on_step = False
            self._params = [p for p in engine.module.parameters() if p.requires_grad]
            self._saved: Optional[list[Tensor]] = None

    def _pieces(self, grads: bool = False):
        if self._pairs is not None:
            return [(m.data, p.grad if grads else None, p.data) for m, p in self._pairs]
        return [(p.data if self._saved is None else s, p.grad if grads else None, p.data)
                for p, s in zip(self._params, self._saved or [None] * len(self._params))]

    @torch.no_grad()
    def write(self, fill: Callable[[int, Tensor], object]) -> None:
        if self._pairs is None and self._saved is None:
            self._saved = [p.detach().clone() for p in self._params]
        super().write(fill)

    @torch.no_grad()
    def restore(self) -> None:
        super().restore()
        if self._pairs is None:
            self._saved = None


class Zero12Backend(DeepSpeedBackend):
    """Stages 1 and 2: bit16 weights replicated, fp32 masters and gradients partitioned.

    Each parameter's local fragment is p._hp_mapping (None on a rank holding none of it). After
    writing its fragments a rank all-gathers the bit16 partitions (DeepSpeed's own routine), so
    every rank's replica holds theta + e; that is the one collective ZeRO-1/2 adds beyond the
    packed all-reduce, P bit16 elements in all (docs/how-it-works.md, the backend table).
    """

    def _groups(self):
        opt = self.engine.optimizer
        return opt.bit16_groups if hasattr(opt, "bit16_groups") else opt.bf16_groups

    def _pieces(self, grads: bool = False):
        pieces = []
        for group in self._groups():
            for p in group:
                m = p._hp_mapping
                if m is None:
                    continue
                start, numel = m.lp_fragment_address.start, m.lp_fragment_address.numel
                g = m.get_lp_grad_fragment(p._index_in_param_group) if grads else None
                if g is not None:
                    g = g.view(-1)
                    if g.numel() != numel:  # BF16_Optimizer keeps full-size fp32 grads
                        g = g.narrow(0, start, numel)
                pieces.append((m.hp_fragment.data, g, p.data.view(-1).narrow(0, start, numel)))
        return pieces

    def _sync(self) -> None:
        from deepspeed.runtime.utils import all_gather_dp_groups

        opt = self.engine.optimizer
        flat = opt.bit16_groups_flat if hasattr(opt, "bit16_groups_flat") else opt.bf16_groups_flat
        parts = (opt.parallel_partitioned_bit16_groups if hasattr(opt, "parallel_partitioned_bit16_groups")
                 else opt.bf16_partitioned_groups)
        all_gather_dp_groups(groups_flat=flat, partitioned_param_groups=parts,
                             dp_process_group=opt.real_dp_process_group,
                             start_alignment_factor=opt.nccl_start_alignment_factor,
                             allgather_bucket_size=opt.allgather_bucket_size)


class Zero3Backend(DeepSpeedBackend):
    """Stage 3: p.ds_tensor is this rank's padded partition in model dtype; the fp32 master and
    gradient partitions have the same layout. Only the real (unpadded) prefix is used: the
    padding of theta is uninitialised memory.

    After a write every gathered copy is stale. DeepSpeed's parameter coordinator releases them
    all, persistent ones (below stage3_param_persistence_threshold) included, after waiting for
    any prefetch in flight; the next forward gathers theta + e in its own bucketed prefetch, and
    persistent parameters stay resident from then on as usual. (Re-gathering each copy still held,
    e.g. after the no-grad target forward, took one collective per parameter: 73 instead of 1 on
    a 4-layer BERT.)
    """

    def _params(self) -> list[nn.Parameter]:
        return [p for p in self.engine.module.parameters() if p.requires_grad]

    def _pieces(self, grads: bool = False):
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad

        pieces = []
        for p in self._params():
            part = p.ds_tensor.numel()
            n = max(0, min(p.ds_numel - self.rank * part, part))
            g = safe_get_local_grad(p) if grads else None
            pieces.append((safe_get_local_fp32_param(p).data.view(-1)[:n],
                           None if g is None else g.view(-1)[:n],
                           p.ds_tensor.data.view(-1)[:n]))
        return pieces

    def _sync(self) -> None:
        self.engine.optimizer.parameter_offload.partition_all_parameters()

    @contextlib.contextmanager
    def target_forward(self):
        # ZeRO-3 frees a module's gathered weights in the backward once its ds_grads_remaining
        # (the pass's inputs that need a gradient) counts down to 0, and every forward resets it
        # to 0 first. A no-grad forward in between leaves 0, the backward counts to -1, and every
        # layer's weights stay gathered to the backward's end (measured: +119 MB with 2 layers,
        # +238 MB with 4; bench/zero3_no_grad_forward.py). Keep the pass's counts.
        counts = {m: m.ds_grads_remaining for m in self.engine.module.modules() if hasattr(m, "ds_grads_remaining")}
        try:
            yield
        finally:
            for m, n in counts.items():
                m.ds_grads_remaining = n


def make_deepspeed_backend(engine, group=None) -> DeepSpeedBackend:
    stage = engine.zero_optimization_stage()
    _check_internals(engine, stage)
    cls = {0: Zero0Backend, 1: Zero12Backend, 2: Zero12Backend, 3: Zero3Backend}[stage]
    return cls(engine, group)


def _check_internals(engine, stage: int) -> None:
    """The ZeRO internals the pieces above read and write, present in this DeepSpeed."""
    from ..versions import require

    opt, params = engine.optimizer, [p for p in engine.module.parameters() if p.requires_grad]
    if stage in (1, 2):
        require("deepspeed", "the ZeRO-1/2 optimizer's bit16 groups and partitions",
                (hasattr(opt, "bit16_groups") and hasattr(opt, "bit16_groups_flat")
                 and hasattr(opt, "parallel_partitioned_bit16_groups"))
                or (hasattr(opt, "bf16_groups") and hasattr(opt, "bf16_groups_flat")
                    and hasattr(opt, "bf16_partitioned_groups")))
        mapped = [p._hp_mapping for p in params if getattr(p, "_hp_mapping", None) is not None]
        require("deepspeed", "the parameters' fragment mappings (p._hp_mapping with lp_fragment_address, "
                "hp_fragment, get_lp_grad_fragment)", all(hasattr(p, "_hp_mapping") for p in params) and all(
                    hasattr(m, "lp_fragment_address") and hasattr(m, "hp_fragment")
                    and hasattr(m, "get_lp_grad_fragment") for m in mapped))
    elif stage == 3:
        require("deepspeed", "ZeRO-3's partitions (p.ds_tensor, p.ds_numel) and parameter_offload."
                "partition_all_parameters", all(hasattr(p, "ds_tensor") and hasattr(p, "ds_numel") for p in params)
                and hasattr(getattr(opt, "parameter_offload", None), "partition_all_parameters"))
