"""TRAM: a sharding-aware SAM-family optimizer wrapper whose radius is a trust-region divergence."""
from __future__ import annotations

import contextlib
import math
import statistics
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from . import divergence, rules
from .backends import make_backend
from .config import TRAMConfig
from .forward import default_forward, split_output
from .head import HeadTap
from .targets import NoisedInput, Snapshot

# The local partials a step accumulates, and their places in the packed vector of the step's
# single all-reduce (after the rule's sums).
_PARTIAL_KL_SUM, _PARTIAL_KL_COUNT, _PARTIAL_LOSS_SUM, _PARTIAL_LOSS_COUNT = range(4)
_KL_SUM, _KL_COUNT, _LOSS_SUM, _LOSS_COUNT = (rules.NUM_SUMS + i for i in range(4))


class TRAM:
    """Wraps a model (plain, DDP, FSDP1, FSDP2) and its base optimizer, or a DeepSpeed engine.

    One step (docs/how-it-works.md):
      1. pass 1 at theta over the step's micro-batches; for each, between its forward and its
         backward, a no-grad target forward and the local KL sum and count, chunk by chunk (its
         logits are released before the backward, so they add nothing to the backward's peak);
      2. ONE all-reduce of [N, sum g^2, sum u^2, KL sum, KL count, loss sum, loss count];
      3. d_t = scale * KL sum / KL count (clamped at rho_max), or the fixed rho without a target;
         e = d_t * u / (sqrt(N) + eps) on each rank's own shard; theta <- theta + e;
      4. pass 2 at theta + e on the same micro-batches;
      5. restore theta exactly, refresh the target snapshot, base optimizer step with g'.

    Use ``step(batches)`` in a plain loop, or the explicit calls ``observe`` (after each pass-1
    forward), ``ascent_step`` and ``descent_step`` around a second pass you run yourself.

    Host reads: losses, KL sums and counts stay on the device; a step reads one packed vector
    back (the all-reduce's result, for the radius and the skip decision). Metrics that would need
    another read (loss_perturbed, loss_local) are 0-d tensors on the device: reading them is yours.
    """

    def __init__(self, model: Any, optimizer: Optional[torch.optim.Optimizer] = None,
                 config: Optional[TRAMConfig] = None, *, forward_fn: Optional[Callable] = None,
                 embedding: Optional[nn.Module] = None, group=None, scaler=None):
        self.config = config if config is not None else TRAMConfig()
        self.config.validate()
        self.backend = make_backend(model, optimizer, group, scaler)
        self.backend.validate(self.config)
        self.forward_fn = forward_fn or default_forward
        self.noised: Optional[NoisedInput] = None
        self.snapshot: Optional[Snapshot] = None
        target = self.config.target
        if target == "noised_input":
            embedding = embedding if embedding is not None else _input_embedding(self.backend.inner_module)
            self.noised = NoisedInput(embedding, self.config.sigma, self.config.noise, self.config.seed, self.backend.rank)
        elif target is not None:
            self.snapshot = Snapshot(target, self.config.ema_decay)
        self.tap = HeadTap.find(self.backend.inner_module) if self._may_tap() else None
        self.step_count = 0
        self._partial = torch.zeros(4, dtype=torch.float64)
        self._started = self._ascended = False
        self._metrics: dict[str, float] = {}
        self._held: list[Tensor] = []  # TRAM-Fisher's pass-1 logits
        self._skip = False
        self._warned_zero_e = False
        self.forward_role: Optional[str] = None
        # scale="auto": the scale once fixed (None while calibrating) and the KLs recorded so far.
        self.scale: Optional[float] = None if self.config.scale == "auto" else self.config.scale
        self._auto_kls: list[float] = []

    # -- the one-call step ------------------------------------------------------------------
    def step(self, batches: Any, update: bool = True) -> dict[str, float]:
        """One TRAM step over ``batches`` (one batch, or a list of micro-batches); returns metrics.

        ``update=False`` ends the step with theta restored and g' left in the gradients, for a
        caller that clips and steps the base optimizer itself (the HF Trainer; not DeepSpeed)."""
        micro = list(batches) if isinstance(batches, list) else [batches]
        n = len(micro)
        if n == 0:
            raise ValueError("tram.step got an empty list of micro-batches: pass one batch or a non-empty list")
        if self._started:
            raise ValueError("tram.step() while an explicit step is open (observe/ascent_step called without "
                             "descent_step): finish that step with descent_step() first")
        self._check_update(update)
        self.backend.check_micro_batches(n)
        if self.step_count % self.config.interval != 0:
            return self._plain_step(micro, update)
        if self.config.mode == "micro":
            return self._micro_step(micro, update)
        sync = self.config.scope == "global"  # scope "rank": pass 1 keeps each rank's own gradient
        for i, batch in enumerate(micro):
            self._pass("pass1", batch, i, n, sync=sync)
        self.ascent_step()
        perturbed = torch.stack([self._pass("pass2", batch, i, n) for i, batch in enumerate(micro)]).mean()
        return self.descent_step(loss_perturbed=perturbed, update=update)

    def _pass(self, role: str, batch: Any, index: int, n: int, sync: bool = True,
              reduce_each: bool = False) -> Tensor:
        """Forward and backward of micro-batch ``index`` of ``n`` in one pass; returns its loss (on the
        device). The gradient is that of the loss over n; the backend reduces it with the window's
        last micro-batch (``reduce_each``: with this one alone).

        role "pass1": at theta, observed (the target's KL is taken before the backward, so its logits
        are gone by then); "pass2": at theta + e (TRAM-Fisher's KL, likewise); "plain": at theta,
        nothing observed (interval > 1)."""
        with self.backend.micro_batch(*((0, 1) if reduce_each else (index, n)), sync=sync):
            with self.first_pass() if role == "pass1" else contextlib.nullcontext():
                loss, logits, mask = self._call_forward("pass2" if role == "pass2" else "pass1",
                                                        self.backend.forward_module, batch)
            if role == "pass1":
                self.observe(batch, logits, mask, loss)
            elif role == "pass2":
                self.observe_perturbed(logits, mask)
            del logits
            self.backend.backward(loss, n)
        return loss.detach()

    def _micro_step(self, micro: list, update: bool) -> dict[str, float]:
        """mode "micro": for each micro-batch its own pass 1 (the gradient of its mean loss), one
        packed all-reduce, e, and pass 2 scaled by 1/n. g' adds up over the micro-batches; the
        sum so far is kept aside (one shard-sized copy) while the next pass 1 runs."""
        n, perturbed, radii = len(micro), 0.0, []
        for i, batch in enumerate(micro):
            stash = self.backend.stash_grads() if i > 0 else None
            self._pass("pass1", batch, 0, 1, sync=self.config.scope == "global")
            radii.append(self.ascent_step())
            perturbed += self._pass("pass2", batch, i, n, reduce_each=True) / n
            self.backend.restore()
            if stash is not None:
                self.backend.unstash_grads(stash)
        self._metrics["d"] = sum(radii) / n
        return self.descent_step(loss_perturbed=perturbed, update=update)

    def _plain_step(self, micro: list, update: bool) -> dict[str, float]:
        """One pass and the base update (interval > 1): no perturbation, no added collective."""
        n = len(micro)
        loss_sum = sum(self._pass("plain", batch, i, n) for i, batch in enumerate(micro))
        self._metrics = {"tram": 0.0}
        return self._descend(None, update) | {"loss_local": loss_sum / n}

    # -- the explicit calls -----------------------------------------------------------------
    def first_pass(self):
        """Context for each pass-1 forward: noised input embeddings for TRAM-Fisher, else nothing."""
        return self.noised.active() if self.config.noised_pass else contextlib.nullcontext()

    def observe_perturbed(self, logits: Tensor, mask: Optional[Tensor] = None) -> None:
        """TRAM-Fisher only (a no-op otherwise): after each pass-2 forward (before its backward
        saves memory), in micro-batch order, the local KL(p(x+z; theta) || p(x; theta+e)) that the
        next step's radius is made of. The held pass-1 logits are released here."""
        if not self.config.noised_pass or self._skip:
            return
        target = self._held.pop(0)
        self._add_kl(divergence.kl_sum_count(logits, target, self.config.divergence, mask, self.config.kl_chunk))

    def observe(self, batch: Any, logits: Tensor, mask: Optional[Tensor] = None,
                loss: Optional[Tensor] = None) -> None:
        """Record one pass-1 micro-batch: its loss, and the target forward's local KL sum/count.

        Call it after that micro-batch's forward, before or after its backward. Before is what
        ``step`` does: the logits can then be released before the backward's peak. A snapshot
        target is loaded into the parameters for its forward and restored bit for bit before
        this returns, so the pending backward sees theta. TRAM-Fisher keeps the logits (in the
        model's dtype) until that micro-batch's pass 2.
        """
        self._begin()
        if loss is not None:
            self._to_device(loss.device)
            self._partial[_PARTIAL_LOSS_SUM] += loss.detach().double()
            self._partial[_PARTIAL_LOSS_COUNT] += 1
        if self.config.noised_pass:  # pass 1 ran on noised inputs: its logits are the target
            self.noised.check_fired()
            self._held.append(logits.detach())
            return
        kl = self._target_kl(batch, logits.detach(), mask)
        if kl is not None:
            self._add_kl(kl)

    @torch.no_grad()
    def ascent_step(self) -> float:
        """One all-reduce, then theta <- theta + e on every local shard; zeroes the gradients.

        Returns the radius used (d_t, or rho without a target)."""
        self._begin()
        self._ascended = True
        cfg, backend = self.config, self.backend
        thetas, grads = backend.local_params(), backend.local_grads()
        local = cfg.scope == "rank"  # e from this rank's own gradient and KL (per-rank m-sharpness)
        inv = 1.0 / backend.grad_scale()  # fp16: the gradients carry the loss scale
        sums = rules.local_sums(cfg.geometry, thetas, grads, cfg.eta, cfg.eta_f, inv)
        sums = sums if local else sums * backend.norm_weight
        vector = torch.cat([sums, self._partial.to(sums.device)])
        if local:  # all_reduce works in place: keep the local values next to the reduced ones
            vector = torch.cat([vector, vector])
            backend.all_reduce(vector[: vector.numel() // 2])
        else:
            backend.all_reduce(vector)  # the step's one collective
        packed = vector.tolist()  # the step's one host read
        if local:  # e from the local values; the reduced copy still decides a skip, alike everywhere
            half = len(packed) // 2
            packed = [o if math.isfinite(p) else math.nan for p, o in zip(packed[:half], packed[half:])]
        self._metrics = {"tram": 1.0}
        if not all(math.isfinite(v) for v in packed):
            # Every rank holds the same reduced values, so every rank skips alike: theta stays,
            # the gradients are dropped and descent_step makes no update.
            self._skip = True
            backend.skip()
            self._partial.zero_()
            self._metrics.update(skipped=1.0, d=math.nan)
            return math.nan
        r = self._radius(packed)
        factor = rules.scale_factor(r, float(packed[rules.NORMALISER]), cfg.eps)
        backend.write(lambda i, out: rules.ascent(cfg.geometry, thetas[i], grads[i], factor, cfg.eta, cfg.eta_f, inv, out))
        backend.zero_grad()
        count = float(packed[_KL_COUNT])
        if cfg.target is not None:
            self._metrics["kl_scale"] = self.scale if self.scale is not None else math.nan
        self._metrics.update({
            "d": r,
            "kl": float(packed[_KL_SUM]) / count if count > 0 else 0.0,
            "grad_norm": math.sqrt(float(packed[rules.GRAD_SQ])),
            "e_norm": rules.e_norm(r, packed[: rules.NUM_SUMS], cfg.eps),
            "loss": float(packed[_LOSS_SUM]) / max(float(packed[_LOSS_COUNT]), 1.0),
        })
        if self._metrics["e_norm"] == 0.0 and self._metrics["grad_norm"] > 0.0 and r > 0.0 and not self._warned_zero_e:
            self._warned_zero_e = True
            warnings.warn(f"TRAM: e = 0 at step {self.step_count + 1} although the gradient is not zero (grad_norm "
                          f"{self._metrics['grad_norm']:.3g}): with geometry='asam' and eta={cfg.eta}, T = |theta| + eta "
                          "is 0 where the trained weights are 0 (LoRA's B matrices start at zero), so nothing is "
                          "perturbed. For adapters use geometry='sam' (docs/trainer-and-cli.md: LoRA adapters), or eta > 0",
                          stacklevel=2)
        # Pass 2 of TRAM-Fisher adds the next step's KL from here on.
        self._partial.zero_()
        return r

    def descent_step(self, loss_perturbed: Optional[float] = None, update: bool = True) -> dict[str, float]:
        """Restore theta, refresh the snapshot, and take the base step with the gradient at theta + e.

        ``loss_perturbed`` (this rank's loss at theta + e) is only reported. ``update=False``
        stops before the base step: theta restored, g' in the gradients for the caller to clip
        and apply (TRAM's max_grad_norm must then be None: the caller owns clipping)."""
        if not self._ascended:
            raise ValueError("descent_step() without ascent_step(): the explicit calls are observe (each pass-1 "
                             "micro-batch), ascent_step, your pass 2, then descent_step")
        return self._descend(loss_perturbed, update)

    def _descend(self, loss_perturbed, update: bool) -> dict[str, Any]:
        self._check_update(update)
        self.backend.prepare_step()
        if not self._skip and update and self.config.max_grad_norm is not None:
            norm = self.backend.clip_grad_norm(self.config.max_grad_norm)  # global: same on every rank
            self._metrics["grad_norm_perturbed"] = norm
            self._skip = not math.isfinite(norm)
        if self._skip:
            self.backend.zero_grad()
            self._metrics["skipped"] = 1.0
        elif not update:  # the caller clips and steps; the snapshot sees theta before that update
            if self.snapshot is not None:
                self.snapshot.before_update(self.backend.local_params())
        else:
            before = [t.clone() for t in self.snapshot.tensors] if self._snapshot_moves() else None
            if self.snapshot is not None:
                self.snapshot.before_update(self.backend.local_params())
            if not self.backend.step():  # an overflow in pass 2: the update was skipped
                self._metrics["skipped"] = 1.0
                if before is not None:
                    self.snapshot.tensors = before
        return self._end_step(loss_perturbed)

    def _check_update(self, update: bool) -> None:
        """update=False hands the base step to the caller: only where TRAM does not own it."""
        if update:
            return
        if not self.backend.caller_may_update:
            raise ValueError(f"update=False: on the {self.backend.name} backend the optimizer step is the engine's "
                             "own (engine.step() after pass 2), so TRAM takes it; use update=True")
        if self.config.max_grad_norm is not None or self.backend.update_may_skip():
            raise ValueError("update=False leaves clipping and loss scaling to the caller: set "
                             "TRAMConfig.max_grad_norm=None and pass TRAM no scaler")

    def _end_step(self, loss_perturbed) -> dict[str, Any]:
        self.step_count += 1
        self._started = self._skip = self._ascended = False
        self._held.clear()
        metrics = {"step": float(self.step_count), "skipped": 0.0, **self._metrics}
        if loss_perturbed is not None:
            metrics["loss_perturbed"] = loss_perturbed  # a 0-d tensor from step(): not read here
        return metrics

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """TRAM's own state on this rank (the stack saves model and optimizer): counters, the noise
        generator, this rank's snapshot shards, TRAM-Fisher's carried KL. Only between steps."""
        if self._started or self.backend.is_loaded():
            raise ValueError("state_dict/save_checkpoint called between ascent_step and descent_step: the "
                             "weights hold theta + e; save after descent_step")
        return {
            "config": self.config.to_dict(), "step_count": self.step_count,
            "world_size": self.backend.world_size, "rank": self.backend.rank,
            "generator": None if self.noised is None else self.noised.generator.get_state(),
            "snapshot": None if self.snapshot is None else self.snapshot.tensors,
            "partial": self._partial.clone(),
            "local_numels": [t.numel() for t in self.backend.local_params()],
            "scale": self.scale, "auto_kls": list(self._auto_kls),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        numels = [t.numel() for t in self.backend.local_params()]
        if state["world_size"] != self.backend.world_size or state["local_numels"] != numels:
            raise ValueError(f"TRAM state from world size {state['world_size']} with local shards "
                             f"{state['local_numels'][:4]}... does not fit world size {self.backend.world_size} "
                             f"with local shards {numels[:4]}...: resume with the same ranks and sharding")
        if TRAMConfig.from_dict(state["config"]) != self.config:
            raise ValueError("TRAMConfig differs from the checkpoint's; resume with the same settings "
                             f"(checkpoint: {state['config']})")
        self.step_count = state["step_count"]
        self._partial = state["partial"].clone()
        if self.config.scale == "auto":
            self.scale, self._auto_kls = state["scale"], list(state["auto_kls"])
        if self.noised is not None:
            self.noised.generator.set_state(state["generator"])
        if self.snapshot is not None and state["snapshot"] is not None:
            device = self.backend.local_params()[0].device if numels else "cpu"
            self.snapshot.tensors = [t.to(device) for t in state["snapshot"]]

    # -- internals ---------------------------------------------------------------------------
    def _snapshot_moves(self) -> bool:
        """Whether to keep the snapshot's old value in case the update is skipped (loss scaling):
        the refresh happens before the step, and a skipped update must not count as one."""
        return (self.backend.update_may_skip() and self.snapshot is not None
                and self.snapshot.tensors is not None and self.snapshot.kind != "initial")

    def _add_kl(self, kl: tuple[Tensor, Tensor]) -> None:
        """Add one micro-batch's local KL sum and prediction count to the step's partials (on the device)."""
        kl_sum, count = kl
        self._to_device(kl_sum.device)
        self._partial[_PARTIAL_KL_SUM] += kl_sum
        self._partial[_PARTIAL_KL_COUNT] += count

    def _to_device(self, device: torch.device) -> None:
        if self._partial.device != device:
            self._partial = self._partial.to(device)

    def _may_tap(self) -> bool:
        """Chunked target logits through the LM head: a built-in forward, a target forward to make."""
        cfg = self.config
        has_forward = cfg.target is not None and not cfg.noised_pass
        return cfg.head_chunks and has_forward and getattr(self.forward_fn, "returns_model_logits", False)

    def _begin(self) -> None:
        if not self._started:
            self._started = True
            if self.snapshot is not None:
                self.snapshot.start(self.backend.local_params())

    def _target_kl(self, batch: Any, current: Tensor, mask: Optional[Tensor]) -> Optional[tuple[Tensor, Tensor]]:
        """The target forward of one micro-batch and its local (KL sum, count); None without a target
        (yet). A snapshot is loaded for the forward and theta restored, bit for bit, before returning."""
        if self.noised is not None:
            context = self.noised.active()
        elif self.snapshot is not None and self.snapshot.has_history:
            self.backend.load(self.snapshot.tensors)
            context = contextlib.nullcontext()
        else:
            return None
        try:
            with torch.no_grad(), context, self.backend.target_forward():
                kl = self._measure(batch, current, mask)
        finally:
            if self.snapshot is not None:
                self.backend.restore()
        if self.noised is not None:
            self.noised.check_fired()
        return kl

    def _measure(self, batch: Any, current: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        cfg, module = self.config, self.backend.target_module
        if self.tap is not None and not self.tap.disabled and isinstance(batch, Mapping):
            # The target's logits a chunk at a time inside the LM head; no labels: no loss computed.
            with self.tap.measuring(current, mask, cfg.divergence, cfg.kl_chunk) as job:
                output = module(**{k: v for k, v in batch.items() if k != "labels"})
            if self.tap.accept(job, output):
                return job["kl"]
            # Not measured in the head (see HeadTap): the full target forward once more.
        target = self._call_forward("target", module, batch)[1]
        return divergence.kl_sum_count(current, target, cfg.divergence, mask, cfg.kl_chunk)

    def _call_forward(self, role: str, module: nn.Module, batch: Any) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """forward_fn for one of a step's forwards; ``forward_role`` says which while it runs:
        "pass1" (at theta; the step's loss), "target" (no grad; only the logits are used) or
        "pass2" (at theta + e). A forward that keeps metrics (TRL's SFTTrainer) counts pass 1 only."""
        self.forward_role = role
        try:
            return split_output(self.forward_fn(module, batch))
        finally:
            self.forward_role = None

    def _radius(self, packed: Tensor) -> float:
        cfg = self.config
        if cfg.target is None:
            return cfg.radius
        if self.snapshot is not None and not self.snapshot.has_history:
            return cfg.radius_at_start
        if cfg.noised_pass and self.step_count == 0:  # TRAM-Fisher measures its KL one step late
            return cfg.radius_at_start
        if self.scale is None:  # scale="auto", calibrating: the baseline radius; the step's KL recorded
            self._calibrate(float(packed[_KL_SUM]), float(packed[_KL_COUNT]))
            return min(cfg.radius, cfg.rho_max) if cfg.rho_max is not None else cfg.radius
        return divergence.radius(float(packed[_KL_SUM]), float(packed[_KL_COUNT]), self.scale, cfg.rho_max)

    def _calibrate(self, kl_sum: float, count: float) -> None:
        """Record one step's mean KL; after auto_steps of them fix scale = baseline / their median.
        The values come from the packed all-reduce, so every rank fixes the same scale."""
        if count <= 0:
            return
        self._auto_kls.append(kl_sum / count)
        if len(self._auto_kls) < self.config.auto_steps:
            return
        median = statistics.median(self._auto_kls)
        if median > 0:
            self.scale = self.config.radius / median
        else:  # the target equals the model everywhere (sigma 0?): nothing to scale; keep calibrating
            warnings.warn(f"TRAM scale='auto': the median KL of {len(self._auto_kls)} steps is {median}; "
                          "the radius stays the baseline and calibration starts again", stacklevel=3)
            self._auto_kls.clear()


def _input_embedding(module: nn.Module) -> nn.Module:
    getter = getattr(module, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if embedding is None:
        raise ValueError("target='noised_input' needs the model's input-embedding layer: the model has no "
                         "get_input_embeddings(); pass embedding=<the nn.Module whose output gets the noise>")
    return embedding
