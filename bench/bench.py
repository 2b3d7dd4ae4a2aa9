"""`make bench`: what a TRAM step costs on every backend, measured side by side on 2 ranks.

    python bench/bench.py                          # every backend; table on stdout, bench/results.json
    python bench/bench.py --backends ddp,zero3 --rounds 4

For each backend one torchrun job (2 gloo ranks, 1 thread each) wraps one model and takes steps
of every method in turn, round after round: the base optimizer alone (one forward and backward),
SAM, TRAM with each target, and, on DDP and FSDP2, two peers written the way a plain training
loop would: `plain_sam` keeps a full copy of the weights and takes the norm of the local gradient
(on FSDP2 the copy is gathered and the norm is wrong: it is the local shard's), `gathered_sam`
gathers the full gradient to take the global norm. The first round warms up; step_time_ratio is
a method's median step time over the base step's median from the same rounds, and ratio_range
the smallest and largest of the rounds' own ratios (a method's step over the base step of its
round): its spread. Collectives and bytes come from one more step of each method, per rank:
collectives_per_step counts the c10d ops the step dispatches (a dispatch mode, which sees DDP's
C++ reducer too); bytes_per_step is the full tensor each collective carries (an all-gather's
output, a reduce-scatter's input, an all-reduce's tensor): from the op's own tensor argument where
it takes one, else from torch.distributed's functions patched for that step (DDP's buckets are
routed through its default all-reduce hook to pass them), and the peers' DTensor gathers and
scatters counted by the peers themselves. extra_bytes_per_rank is what the method holds on the
rank besides the model, the optimizer and the gradients: TRAM's copy of the local theta pieces
while theta + e is loaded (FSDP, DDP; none on DeepSpeed, which restores from its fp32 masters),
the peers' weight copies, and a target's snapshot (target_bytes_per_rank, counted apart).

The model is a BERT encoder built from a config (hidden 384, 4 layers, 8,192-token vocabulary,
10.2M parameters) on 16 sequences of 64 tokens per rank, so one base step takes on the order of
a second here and the step, not Python, dominates.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from launcher import free_port  # noqa: E402

BACKENDS = ("ddp", "fsdp1", "fsdp2", "zero0", "zero1", "zero2", "zero3")
TRAM_METHODS = {
    "sam": dict(geometry="sam", target=None),
    "tram_noised_input": dict(target="noised_input", scale=10.0, rho_max=1.0),
    "tram_previous": dict(target="previous", scale=6000.0, rho_max=1.0),
    "tram_initial": dict(target="initial", scale=4.0, rho_max=1.0),
    "tram_ema": dict(target="ema", scale=4.0, rho_max=1.0),
    "tram_fisher": dict(geometry="fisher", target="noised_input", noised_pass=True, scale=3.0, rho_max=1.0),
}
PEERS = {"ddp": ("plain_sam",), "fsdp2": ("plain_sam", "gathered_sam")}
BATCH, SEQ, VOCAB = 16, 64, 8192  # default sequences per rank, tokens per sequence, vocabulary
RHO = 0.05


def build_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536,
        max_position_embeddings=SEQ, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def wrap(backend: str, model, batch: int):
    """(what TRAM wraps, base optimizer or None)."""
    from transformers.models.bert.modeling_bert import BertLayer

    if backend == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        return ddp, torch.optim.AdamW(ddp.parameters(), lr=1e-5)
    if backend == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        fsdp = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({BertLayer}), use_orig_params=True,
                    device_id=torch.device("cpu"))
        return fsdp, torch.optim.AdamW(fsdp.parameters(), lr=1e-5)
    if backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5)
    import deepspeed

    stage = int(backend[-1])
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5), config={
        "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "zero_optimization": zero,
        "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0})
    return engine, None


class CommBytes:
    """Bytes of the collectives whose ops take tensor lists, which the counter does not size
    (all-reduce, broadcast, all-gather into a list, scatter): torch.distributed's functions,
    patched (DeepSpeed and DTensor call them by attribute), and DDP's gradient buckets, routed
    through the default all-reduce hook so that they pass the patched all_reduce."""

    NAMES = ("all_reduce", "broadcast", "all_gather", "scatter", "reduce", "gather")

    def __init__(self):
        self.bytes, self.on = collections.Counter(), False
        for name in self.NAMES:
            setattr(dist, name, self._counting(name, getattr(dist, name)))

    def _counting(self, name, fn):
        def call(*args, **kwargs):
            if self.on:
                first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, (torch.Tensor, list))), None)
                items = first if isinstance(first, list) else [first]
                self.bytes[name] += sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))
            return fn(*args, **kwargs)

        return call

    def add(self, name: str, nbytes: int) -> None:
        if self.on:
            self.bytes[name] += nbytes

    @staticmethod
    def route_ddp(ddp) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp.register_comm_hook(None, allreduce_hook)  # the same all-reduce, called from Python


class Base:
    """The base optimizer alone: one forward and backward, one update."""

    def __init__(self, wrapped, optimizer, backend):
        self.wrapped, self.optimizer, self.deepspeed = wrapped, optimizer, backend.startswith("zero")

    def step(self, batch):
        loss = self.wrapped(**batch).loss
        if self.deepspeed:
            self.wrapped.backward(loss)
            self.wrapped.step()
        else:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    extra_bytes = target_bytes = 0


class TramMethod:
    def __init__(self, wrapped, optimizer, settings):
        from tram_dist import TRAM, TRAMConfig

        self.tram = TRAM(wrapped, optimizer, TRAMConfig(**settings))
        self.extra_bytes = 0
        backend, restore = self.tram.backend, self.tram.backend.restore

        def measured_restore():  # what the backend holds while theta + e is loaded
            saved = getattr(backend, "_saved", None) or []
            self.extra_bytes = max(self.extra_bytes, sum(t.numel() * t.element_size() for t in saved))
            restore()

        backend.restore = measured_restore

    def step(self, batch):
        self.tram.step(batch)

    @property
    def target_bytes(self) -> int:
        return self.tram.snapshot.nbytes() if self.tram.snapshot is not None else 0


class PlainSAM:
    """A plain-loop SAM: a full copy of the weights, the norm of the local gradient."""

    def __init__(self, wrapped, optimizer, gather_grad: bool, comm: CommBytes):
        self.model, self.optimizer, self.gather_grad, self.comm = wrapped, optimizer, gather_grad, comm
        self.params = [p for p in wrapped.parameters() if p.requires_grad]
        self.extra_bytes = self.target_bytes = 0

    def step(self, batch):
        from torch.distributed.tensor import DTensor, distribute_tensor

        self.model(**batch).loss.backward()
        with torch.no_grad():
            sharded = isinstance(self.params[0], DTensor)
            if self.gather_grad:  # gathered_sam: the full gradient on every rank, then the right norm
                full = [p.grad.full_tensor() for p in self.params]
                self.comm.add("full_tensor", sum(t.numel() * t.element_size() for t in full))
                norm = torch.sqrt(sum(g.pow(2).sum() for g in full))
                copy = [p.to_local().clone() for p in self.params]  # the local shard only
                held = full + copy
            else:  # plain_sam: a full weight copy; the norm of whatever gradient is local
                grads = [p.grad.to_local() if sharded else p.grad for p in self.params]
                norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
                copy = [p.full_tensor() if sharded else p.detach().clone() for p in self.params]
                if sharded:
                    self.comm.add("full_tensor", sum(t.numel() * t.element_size() for t in copy))
                held = copy
            self.extra_bytes = max(self.extra_bytes, sum(t.numel() * t.element_size() for t in held))
            for p in self.params:
                local = p.to_local() if sharded else p
                local.add_((p.grad.to_local() if sharded else p.grad) * (RHO / (float(norm) + 1e-12)))
        self.optimizer.zero_grad(set_to_none=True)
        self.model(**batch).loss.backward()
        with torch.no_grad():
            for p, c in zip(self.params, copy):
                if self.gather_grad or not sharded:
                    (p.to_local() if sharded else p).copy_(c)
                else:  # restore the shard from the full copy the way plain code would: redistribute it
                    p.to_local().copy_(distribute_tensor(c, p.device_mesh, p.placements).to_local())
                    self.comm.add("distribute_tensor", c.numel() * c.element_size())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def worker(args) -> None:
    import stacks

    stacks.init_distributed(args.backend)  # ZeRO: skips DeepSpeed's shared-memory JIT build
    torch.set_num_threads(1)
    rank = dist.get_rank()
    comm = CommBytes()
    wrapped, optimizer = wrap(args.backend, build_model(), args.batch)
    if args.backend == "ddp":
        comm.route_ddp(wrapped)
    methods = {"base": Base(wrapped, optimizer, args.backend)}
    for name, settings in TRAM_METHODS.items():
        methods[name] = TramMethod(wrapped, optimizer, settings)
    for name in PEERS.get(args.backend, ()):
        methods[name] = PlainSAM(wrapped, optimizer, gather_grad=name == "gathered_sam", comm=comm)
    g = torch.Generator().manual_seed(1 + rank)
    batch = {"input_ids": torch.randint(0, VOCAB, (args.batch, SEQ), generator=g),
             "labels": torch.randint(0, 2, (args.batch,), generator=g)}
    times = {name: [] for name in methods}
    for round_index in range(args.rounds + 1):
        for name, method in methods.items():
            dist.barrier()
            start = time.perf_counter()
            method.step(batch)
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
            if round_index > 0:
                times[name].append(float(elapsed))
    counts = {}
    for name, method in methods.items():
        dist.barrier()
        comm.bytes.clear()
        comm.on = True
        with stacks.CollectiveCounter() as counter:
            method.step(batch)
        comm.on = False
        # Ops with tensor arguments (all-gather / reduce-scatter into one tensor): their largest
        # tensor (fp32); the rest from the patched calls.
        comm.bytes["tensor_ops"] = 4 * sum(counter.elements.values())
        counts[name] = {"collectives": sum(counter.counts.values()), "bytes": sum(comm.bytes.values()),
                        "by_op": counter.counts, "bytes_by_call": dict(comm.bytes)}
    shard = methods["sam"].tram.backend.local_params()
    shard_bytes = sum(t.numel() * t.element_size() for t in shard)
    result = {"backend": args.backend, "rank": rank, "shard_bytes": shard_bytes,
              "params": sum(p.numel() for p in build_model().parameters()), "methods": {
                  name: {"median_s": statistics.median(times[name]), "times_s": times[name], **counts[name],
                         "extra_bytes": methods[name].extra_bytes, "target_bytes": methods[name].target_bytes}
                  for name in methods}}
    with open(os.path.join(args.out, f"{args.backend}_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed's CPU teardown can abort after a clean run (tests/dist_worker.py)


def launch(backend: str, args) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.abspath(__file__), "--worker", "--backend", backend,
           "--rounds", str(args.rounds), "--batch", str(args.batch), "--tmp", args.tmp]
    env = dict(os.environ, OMP_NUM_THREADS="1", KINETO_LOG_LEVEL="5", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"{backend}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.load(open(os.path.join(args.tmp, f"{backend}_rank{r}.json"))) for r in range(2)]


def records(ranks: list[dict]) -> list[dict]:
    """One record per method: step-time ratio over the base step, and the per-rank maxima."""
    out = []
    base = ranks[0]["methods"]["base"]
    for name in ranks[0]["methods"]:
        per_rank = [r["methods"][name] for r in ranks]
        extra = max(m["extra_bytes"] for m in per_rank)
        shard = max(r["shard_bytes"] for r in ranks)
        # Each round's ratio, over the base step of the same round: their range is the spread.
        ratios = [t / b for t, b in zip(per_rank[0]["times_s"], base["times_s"], strict=True)]
        out.append({
            "backend": ranks[0]["backend"], "method": name,
            "step_time_ratio": per_rank[0]["median_s"] / base["median_s"],
            "ratio_range": [min(ratios), max(ratios)],
            "step_time_s": per_rank[0]["median_s"],
            "collectives_per_step": max(m["collectives"] for m in per_rank),
            "bytes_per_step": max(m["bytes"] for m in per_rank),
            "extra_bytes_per_rank": extra, "extra_shards": extra / shard,
            "target_bytes_per_rank": max(m["target_bytes"] for m in per_rank),
            "local_shard_bytes": shard, "params": ranks[0]["params"],
            "collectives_by_op": per_rank[0]["by_op"], "bytes_by_call": per_rank[0]["bytes_by_call"],
        })
    return out


def table(rows: list[dict]) -> str:
    lines = ["| backend | method | step time ratio (range over rounds) | step (s) | collectives/step | MB/step | extra MB/rank (shards) | "
             "target MB/rank |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ratio_range"]
        lines.append(f"| {r['backend']} | {r['method']} | {r['step_time_ratio']:.2f} ({lo:.2f}-{hi:.2f}) | "
                     f"{r['step_time_s']:.3f} | "
                     f"{r['collectives_per_step']} | {r['bytes_per_step'] / 1e6:.1f} | "
                     f"{r['extra_bytes_per_rank'] / 1e6:.1f} ({r['extra_shards']:.2f}) | "
                     f"{r['target_bytes_per_rank'] / 1e6:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--rounds", type=int, default=6, help="timed rounds after one warm-up round")
    p.add_argument("--batch", type=int, default=BATCH,
                   help="sequences per rank (the counts, bytes and held memory do not depend on it; the times do)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=os.path.join(ROOT, "runs", "bench"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.out = args.tmp
        return worker(args)
    backends = args.backends.split(",")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        p.error(f"--backends: unknown {unknown}; allowed: {list(BACKENDS)}")
    os.makedirs(args.tmp, exist_ok=True)
    rows = []
    for backend in backends:
        print(f"== {backend}", flush=True)
        rows += records(launch(backend, args))
        print(table([r for r in rows if r["backend"] == backend]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(["python", *sys.argv]), "rounds": args.rounds, "records": rows}, f, indent=1)
    print("\n" + table(rows))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
