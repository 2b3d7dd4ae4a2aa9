"""One rank of a distributed test: run TRAM steps on this rank's slice, write results to a file.

    torchrun --nproc_per_node 2 tests/dist_worker.py --stack fsdp1 --variant FULL_SHARD,orig \
        --methods sam,asam --steps 3 --out DIR

Each rank writes DIR/rank{r}.pt: {method: {"state": full weights, "metrics": [...]}} and the
collectives of its last step (steady state), so the parent test never parses interleaved stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stacks  # noqa: E402
from tiny import LR, METHODS, SGD_LR, make_batches, make_model, micro_batches, shard  # noqa: E402

from tram_dist import TRAM, TRAMConfig, load_checkpoint, save_checkpoint  # noqa: E402
from tram_dist.shutdown import exit_run  # noqa: E402


def run_method(args, name: str, rank: int, world: int) -> dict:
    model = make_model(0)
    lr = LR if args.optim == "adamw" else SGD_LR
    wrapped, optimizer = stacks.wrap(args.stack, args.variant, model, lr, args.dtype, args.optim, args.micro)
    tram = TRAM(wrapped, optimizer, TRAMConfig(**METHODS[name], **json.loads(args.override)),
                forward_fn=NaNInjector(args.inject, rank, args.inject_value) if args.inject else None,
                scaler=stacks.make_scaler(args.stack) if args.scaler else None)
    metrics, states, collectives = [], [], None
    ckpt = os.path.join(args.ckpt, name) if args.ckpt else None
    first = 0
    if args.resume:
        load_checkpoint(tram, ckpt)
        first = tram.step_count
    for step, batch in enumerate(make_batches(args.steps)):
        if step < first:
            continue
        if args.save_at and step == args.save_at:
            save_checkpoint(tram, ckpt)
            break
        if args.inject:
            tram.forward_fn.step = step
            states.append(stacks.full_state(args.stack, wrapped))
        local = micro_batches(shard(batch, rank, world), args.micro)
        last = step == args.steps - 1
        with stacks.CollectiveCounter() if last else contextlib.nullcontext() as counter:
            if args.explicit:
                m = explicit_step(tram, wrapped, local[0])
            else:
                m = tram.step(local if args.micro > 1 else local[0])
        if args.scaler or args.dtype == "fp16":
            m["scale"] = tram.backend.grad_scale()
        metrics.append(m)
        if last:
            collectives = {"counts": counter.counts, "elements": counter.elements}
    pieces = tram.backend.local_params()
    snapshot = tram.snapshot.tensors if tram.snapshot is not None else None
    return {"state": stacks.full_state(args.stack, wrapped), "metrics": metrics, "collectives": collectives,
            "states_before_step": states,
            "local_numels": [t.numel() for t in pieces],
            "snapshot_numels": None if snapshot is None else [t.numel() for t in snapshot]}


class NaNInjector:
    """A forward function that turns the logits NaN in one pass of one step on one rank only.

    spec "RANK:STEP:PASS": pass 1 or 2 counts the gradient-carrying forwards of the step (the
    no-grad target forwards are never touched)."""

    def __init__(self, spec: str, rank: int, value: str = "nan"):
        self.rank, self.at_step, self.at_pass = (int(x) for x in spec.split(":"))
        self.my_rank, self.step, self.calls, self.value = rank, -1, {}, float(value)

    def __call__(self, model, batch):
        loss, logits = model(**batch)
        if torch.is_grad_enabled():
            n = self.calls[self.step] = self.calls.get(self.step, 0) + 1
            if (self.my_rank, self.step, n) == (self.rank, self.at_step, self.at_pass):
                logits = logits * self.value
                loss = loss * self.value
        return loss, logits


def explicit_step(tram: TRAM, engine, batch: dict) -> dict:
    """The explicit calls around a second pass the user runs, as where the step lives inside
    backward (here a DeepSpeed engine driven by hand)."""
    with tram.first_pass():
        loss, logits = engine(**batch)
    engine.backward(loss)
    tram.observe(batch, logits, loss=loss)
    tram.ascent_step()
    loss2, logits2 = engine(**batch)
    engine.backward(loss2)
    tram.observe_perturbed(logits2)
    return tram.descent_step(loss_perturbed=float(loss2))


def check_grads(args, rank: int, world: int) -> dict:
    """One plain forward/backward on this rank's slice: the stack's own averaged gradient."""
    model = make_model(0)
    wrapped, _ = stacks.wrap(args.stack, args.variant, model, LR, args.dtype)
    loss, _ = wrapped(**shard(make_batches(1)[0], rank, world))
    if args.stack.startswith("zero"):
        wrapped.backward(loss)
    else:
        loss.backward()
    return stacks.plain_grads(args.stack, wrapped)


def baseline_counts(args, rank: int, world: int) -> dict:
    """Collectives of a plain two-pass step and of one no-grad forward, in steady state."""
    model = make_model(0)
    wrapped, optimizer = stacks.wrap(args.stack, args.variant, model, LR, args.dtype)
    batches = [shard(b, rank, world) for b in make_batches(3)]
    for b in batches[:2]:
        stacks.two_pass_step(args.stack, wrapped, optimizer, b)
    with stacks.CollectiveCounter() as two_pass:
        stacks.two_pass_step(args.stack, wrapped, optimizer, batches[2])
    inner = wrapped.module if args.stack.startswith("zero") or args.stack == "ddp" else wrapped
    with stacks.CollectiveCounter() as fwd, torch.no_grad():
        inner(**batches[2])
    return {"two_pass": two_pass.counts, "two_pass_elements": two_pass.elements, "forward": fwd.counts}


BAD_CASES = {
    # case: (stack, extra TRAMConfig fields, micro-batches per step on rank 0 and rank 1, pass the base optimizer too)
    "ds_max_grad_norm": ("zero2", {"max_grad_norm": 1.0}, (1, 1), False),
    "ds_micro_batch_count": ("zero2", {}, (2, 2), False),
    "ds_optimizer_given": ("zero2", {}, (1, 1), True),
    "ds_scaler_given": ("zero2", {}, (1, 1), False),
    "fsdp_noised_without_embedding": ("fsdp2", {"target": "noised_input"}, (1, 1), False),
    "ds_fp16": ("zero0", {}, (1, 1), False),
    "rank_scope_on_sharded": ("fsdp2", {"scope": "rank"}, (1, 1), False),
    "ds_micro_mode": ("zero2", {"mode": "micro"}, (1, 1), False),
    "unwrapped_module_under_group": ("ddp", {}, (1, 1), False),
    "fsdp2_uneven_micro_batches": ("fsdp2", {}, (2, 1), False),
    "zero2_uneven_micro_batches": ("zero2", {}, (2, 1), False),
    "fsdp1_optimizer_before_wrap": ("fsdp1", {}, (1, 1), False),
    "fsdp2_tensor_parallel": ("fsdp2", {}, (1, 1), False),
    "ds_internals_missing": ("zero2", {}, (1, 1), False),
    "fsdp1_internals_missing": ("fsdp1", {}, (1, 1), False),
}


def bad_inputs(args, rank: int, world: int) -> dict:
    """Every case of --bad (comma-separated) in this one process group, one after another: each
    builds its stack, then hits one misconfiguration. Every rank must raise the same ValueError,
    before TRAM issues any collective (the micro-batch count check issues its one all-reduce)."""
    return {case: bad_input(case, rank, world) for case in args.bad.split(",")}


def bad_input(case: str, rank: int, world: int) -> dict:
    stack, fields, micro, give_optimizer = BAD_CASES[case]
    model = make_model(0)
    undo = lambda: None  # noqa: E731
    if case == "fsdp1_optimizer_before_wrap":  # built over the parameters FSDP1 (flat) then replaces
        early = stacks.make_optimizer(model.parameters(), LR)
        wrapped, _ = stacks.wrap("fsdp1", "FULL_SHARD,flat", model, LR)
        optimizer = early
    elif case == "fsdp2_tensor_parallel":
        wrapped, optimizer = _tensor_parallel(model)
    else:
        wrapped, optimizer = stacks.wrap(stack, "FULL_SHARD,orig" if stack == "fsdp1" else "", model, LR,
                                         dtype="fp16" if case == "ds_fp16" else "fp32",
                                         micro=1 if case == "ds_micro_batch_count" else max(micro))
    if case == "fsdp_noised_without_embedding":
        model.get_input_embeddings = lambda: None  # a model that has no such layer
    if case == "unwrapped_module_under_group":
        wrapped = wrapped.module  # TRAM(ddp.module, ...): the plain module under DDP's group
    if case == "ds_internals_missing":  # as a DeepSpeed without ZeRO-1/2's fragment mappings would be
        for p in wrapped.module.parameters():
            del p._hp_mapping
    if case == "fsdp1_internals_missing":  # as a torch whose FSDP1 handle lacks post_reshard would be
        from torch.distributed.fsdp._flat_param import FlatParamHandle

        original = FlatParamHandle.post_reshard
        del FlatParamHandle.post_reshard
        undo = lambda: setattr(FlatParamHandle, "post_reshard", original)  # noqa: E731
    error = None
    with stacks.CollectiveCounter() as counter:
        try:
            opt = (wrapped.optimizer if give_optimizer else None) if stack.startswith("zero") else optimizer
            scaler = torch.amp.GradScaler("cpu") if case == "ds_scaler_given" else None
            tram = TRAM(wrapped, opt, TRAMConfig(**fields), scaler=scaler)
            tram.step(micro_batches(shard(make_batches(1)[0], rank, world), micro[rank]))
        except ValueError as e:
            error = str(e)
        finally:
            undo()
    return {"error": error, "collectives": counter.counts}


def _tensor_parallel(model):
    """fc1 column-wise and fc2 row-wise over the 2 ranks (torch's tensor parallelism), then
    fully_shard over a 1-rank data-parallel dimension: a (dp, tp) mesh TRAM must refuse."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    return model, stacks.make_optimizer(model.parameters(), LR)


def fault_run(args, rank: int, world: int) -> dict:
    """Checkpoint every 2 steps. On torchrun's first attempt rank 1 is SIGKILLed inside the save
    of step 4, after its TRAM file is written but before the stack's checkpoint and `latest`: a
    half-written checkpoint. The restarted job must resume from step 2 and finish."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    name = args.methods.split(",")[0]
    model = make_model(0)
    wrapped, optimizer = stacks.wrap(args.stack, args.variant, model, LR)
    tram = TRAM(wrapped, optimizer, TRAMConfig(**METHODS[name]))
    resumed = load_checkpoint(tram, args.ckpt) if os.path.isfile(os.path.join(args.ckpt, "latest")) else None
    if attempt == 0 and rank == 1:
        save = tram.backend.save_checkpoint

        def dying_save(directory, tag, step):
            if tag == "step4":
                os.kill(os.getpid(), signal.SIGKILL)
            save(directory, tag, step)

        tram.backend.save_checkpoint = dying_save
    for step, batch in enumerate(make_batches(args.steps)):
        if step < tram.step_count:
            continue
        tram.step(shard(batch, rank, world))
        if tram.step_count % 2 == 0:
            save_checkpoint(tram, args.ckpt)
    return {name: {"state": stacks.full_state(args.stack, wrapped)}, "attempt": attempt, "resumed_from": resumed}


def ds_config_run(args, rank: int, world: int) -> dict:
    """3 TRAM steps (2 micro-batches each) through an engine built from a ds_configs/ file."""
    model = make_model(0)
    engine = stacks.engine_from_config(model, args.ds_config, micro=2, micro_batch=2)
    tram = TRAM(engine, None, TRAMConfig(**METHODS["tram_noised"]))
    start = stacks.full_state("zero", engine)
    metrics = []
    for batch in make_batches(3):
        m = tram.step(micro_batches(shard(batch, rank, world), 2))
        m["scale"] = tram.backend.grad_scale()
        metrics.append(m)
    return {"metrics": metrics, "start": start, "state": stacks.full_state("zero", engine),
            "stage": engine.zero_optimization_stage(), "fp16": engine.fp16_enabled(), "bf16": engine.bfloat16_enabled()}


def run_case(args, rank: int, world: int) -> dict:
    """The stack's own gradient and collectives (in fp32), then each method's run."""
    results = {}
    if args.dtype == "fp32":
        results = {"plain_grads": check_grads(args, rank, world), "baseline": baseline_counts(args, rank, world)}
    results.update({name: run_method(args, name, rank, world) for name in args.methods.split(",")})
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stack", default="")
    p.add_argument("--variant", default="")
    p.add_argument("--cases", default="",
                   help="instead of --stack/--variant: STACK:VARIANT pairs joined by ';', each run in turn in "
                        "this one process (a launch costs more than a case here); results keyed by the pair")
    p.add_argument("--methods", default="sam,asam,tram_noised,tram_previous")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--optim", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--explicit", action="store_true", help="drive the step with the explicit calls")
    p.add_argument("--override", default="{}", help="JSON of TRAMConfig fields set on every method")
    p.add_argument("--inject", default="", help="RANK:STEP:PASS where the logits turn NaN")
    p.add_argument("--inject-value", default="nan", help="what the logits are multiplied by there (nan, inf)")
    p.add_argument("--scaler", action="store_true", help="fp16 loss scaling (GradScaler / ShardedGradScaler)")
    p.add_argument("--ckpt", default="", help="checkpoint directory (one subdirectory per method)")
    p.add_argument("--save-at", type=int, default=0, help="save before this step and stop")
    p.add_argument("--resume", action="store_true", help="load the latest checkpoint, then go on")
    p.add_argument("--fault", action="store_true", help="the kill-and-restart run (see fault_run)")
    p.add_argument("--ds-config", default="", help="a ds_configs/ file to train with (see ds_config_run)")
    p.add_argument("--bad", default="", help="misconfigurations to hit, comma-separated (BAD_CASES)")
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
    args = p.parse_args()
    cases = [tuple(c.split(":", 1)) for c in args.cases.split(";")] if args.cases else [(args.stack, args.variant)]
    if not all(stack for stack, _ in cases):
        p.error("give --stack or --cases")
    # A process group DeepSpeed has adopted serves the torch stacks as well.
    stacks.init_distributed(next((stack for stack, _ in cases if stack.startswith("zero")), cases[0][0]))
    # Whatever the imports made lives to the end: DeepSpeed's engine runs gc.collect() each time it
    # is built, which otherwise walks all of it (0.26 s a call, a dozen engines in a run).
    gc.freeze()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.bad or args.fault or args.ds_config:
        result = (bad_inputs(args, rank, world) if args.bad else fault_run(args, rank, world) if args.fault
                  else ds_config_run(args, rank, world))
        torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
        exit_run()
    if args.cases:
        results = {f"{stack}:{variant}": run_case(argparse.Namespace(**{**vars(args), "stack": stack,
                                                                        "variant": variant}), rank, world)
                   for stack, variant in cases}
    else:
        results = run_case(args, rank, world)
    torch.save(results, os.path.join(args.out, f"rank{rank}.pt"))
    exit_run()


if __name__ == "__main__":
    main()
