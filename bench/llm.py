"""`make bench-llm`: a TRAM step at a real LLM's vocabulary and width, memory first.

    python bench/llm.py                        # ZeRO-3 and FSDP2, 2 layers (41 min here); bench/llm_results.json
    python bench/llm.py --layers 24 --stacks zero3 --rounds 1 --dtype bf16 --fresh-malloc   # full depth (0.49B)
    python bench/llm.py --pool bench/llm_results.json bench/llm_results_rounds8.json   # two runs' rounds together

(--fresh-malloc at full depth: two bf16 ranks hold 10-11.6 GB each there, of this machine's 24 GiB, and a
heap that never gives memory back, as the timed steps' does by default, was not tried at that size.)

At full depth two fp32 ranks on one 24 GiB machine are OOM-killed in the first AdamW step (12 GB
resident per rank: each builds the whole model before ZeRO-3 partitions it, and
deepspeed.zero.Init, which would not, fails on torch 2.13 with DeepSpeed 0.19.8: a signature
mismatch in its Tensor.__new__ patch); in bf16 (DeepSpeed's bf16, fp32 masters) a rank holds
10-11.6 GB and the run fits. In fp32, run it where each rank has about 16 GB.

The model is a causal LM built from a config with Qwen2.5-0.5B's shape (vocabulary 151,936,
hidden 896, 14 heads, 2 KV heads, intermediate 4,864, tied embeddings), random weights, nothing
downloaded; by default 2 of its 24 layers so that a step takes seconds here. Each rank trains on
one sequence of 512 tokens: one fp32 logits tensor of the rank's micro-batch is
L = 1 x 512 x 151,936 x 4 bytes = 311 MB, more than the 2 layers' weights.

Each (stack, method) runs in its own 2-rank torchrun job, so that its memory is its own. Memory
first, untimed: an AdamW step (its state then exists, as in any run past its first step), then
AdamW's memory, then a method step (a snapshot target's first step has no target yet: it only
builds the snapshot, and took 0.6x as long as the next one in two runs here), then the method's
memory. A step's memory is two more of its steps (memory_peaks): one under the CPU allocator's view
(tests/allocator.py: the profiler's memory events, exact where RSS moves by 0.2 L from run to run),
one alone for its peak RSS (the kernel's peak reset before the step: /proc/self/clear_refs, Linux),
each from the live memory between two steps, with glibc's malloc at its defaults and every free
page given back first. Then time: malloc keeps what it frees from here on, as a GPU's caching
allocator does (keep_freed_memory: by default the kernel zeroes every large tensor's pages afresh,
about half a step's time here), two untimed rounds of [method step, AdamW step] let its heap grow,
then rounds of the same, each step timed, with its page faults (a heap still growing shows there)
and kernel seconds, and on a GPU its own allocator peak. Per rank it
reports the method's peak over AdamW's (extra_over_adamw_L, in units of L: each step's peak over
the memory it started from), the step time over the AdamW step of the same round (median and range
over the rounds), the fastest method step over the fastest AdamW step (fastest_ratio: the least
disturbed of each, where other work on the host slows some steps and never speeds one up), and the
host reads of a method's step made by tram_dist's code (tests/host_reads.py: torch's
conversions to Python values, counted; DeepSpeed's and the model's own are theirs). weight_copy_L is
what TRAM holds by design on the weight side while theta + e is loaded: a copy of the local shard of
theta (on FSDP2; none on ZeRO-3, whose fp32 masters hold theta), so activation_extra_L =
extra_over_adamw_L - weight_copy_L is the logits side, and allocated_logits_side_L likewise in the
allocator's view. A snapshot target's fp32 shard (snapshot_L) is alive from its first step on,
before the method's memory steps begin, so it is in neither side of a difference (README counts it
on the weight side: one more fp32 copy of the local shard). In the allocator's view the all-gathers of
ZeRO-3 and FSDP2 write in place, as NCCL's do: gloo's all_gather_into_tensor gathers into a
temporary of the output's size and copies it over, so on gloo each gather of a parameter costs twice
its size for a moment (a gather of the 545 MB tied embedding on top of pass 1's activations was
TRAM-previous's whole +0.62 L on ZeRO-3); --gloo-all-gather keeps gloo's there too; the RSS steps
keep gloo's. The workers run with glibc's malloc on transparent huge pages (MALLOC_TUNABLES below).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from allocator import Allocations  # noqa: E402
from host_reads import HostReads  # noqa: E402
from launcher import free_port  # noqa: E402
from stacks import skip_deepspeed_shm_build  # noqa: E402

VOCAB, HIDDEN, SEQ = 151_936, 896, 512
METHODS = {
    "sam": dict(geometry="sam", target=None),
    "tram_x": dict(target="noised_input", scale=10.0, rho_max=1.0),
    "tram_previous": dict(target="previous", scale=6000.0, rho_max=1.0),
    "tram_fisher": dict(geometry="fisher", target="noised_input", noised_pass=True, scale=3.0, rho_max=1.0),
}
STACKS = ("zero3", "fsdp2")
L_BYTES = SEQ * VOCAB * 4
# glibc maps every allocation over 32 MB afresh and returns it on free, so each step pays the
# kernel's page faults for every large tensor again (measured here: 0.6-1.0 million faults in a
# forward and backward, 30-50% of a step's time, in kernel time that varies from run to run).
# Transparent huge pages for malloc's memory cut that to a few thousand faults, not the bytes the
# kernel zeroes (its clear_page was still 43% of the machine's CPU time in a TRAM-x run: docs/results.md,
# "Where the CPU's time goes"; keep_freed_memory is what removes it from the timed steps). One arena
# for every thread, so that gloo's threads allocate from the heap the timed steps keep (with an
# arena of their own, each forward faulted 852 times again and spent 2 s in the kernel). Set
# GLIBC_TUNABLES yourself to measure otherwise.
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1"


@contextlib.contextmanager
def building(dtype: torch.dtype, device="cpu"):
    """Modules made inside are made on ``device`` in ``dtype``: no full fp32 copy on the host first."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


def build_model(layers: int, dtype: torch.dtype = torch.float32, vocab: int = VOCAB, seq: int = SEQ, device="cpu"):
    """Qwen2.5-0.5B's shape (vocabulary and width; ``layers`` of its 24), random weights, seed 0."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=HIDDEN, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, num_hidden_layers=layers, tie_word_embeddings=True,
                         max_position_embeddings=seq, attention_dropout=0.0)
    with building(dtype, device):
        return Qwen2ForCausalLM(config)


def wrap(stack: str, model, bf16: bool = False):
    """(what TRAM wraps, base optimizer or None)."""
    if stack == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5)
    skip_deepspeed_shm_build()
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5), config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "bf16": {"enabled": bf16}})
    return engine, None


def base_step(wrapped, optimizer, batch) -> None:
    if optimizer is None:  # DeepSpeed
        loss = wrapped(**batch).loss
        wrapped.backward(loss)
        wrapped.step()
        return
    loss = wrapped(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class _Done:
    """The handle of a collective that has already completed."""

    def wait(self, *args) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def in_place_all_gather(output_tensor, input_tensor, group=None, async_op=False):
    """all_gather_into_tensor without gloo's temporary: gloo gathers into a new tensor of the
    output's size and copies it over (measured: the peak is twice the output), so every ZeRO-3 or
    FSDP2 gather would cost twice its parameters, which NCCL writes in place. One broadcast per
    rank into its slot of the output gives NCCL's memory; the time is not what matters here."""
    world = dist.get_world_size(group)
    slots = output_tensor.view(world, -1)
    slots[dist.get_rank(group)].copy_(input_tensor)
    for r in range(world):
        dist.broadcast(slots[r], src=r if group is None else dist.get_global_rank(group, r), group=group)
    return _Done() if async_op else None


@contextlib.contextmanager
def gathers_in_place():
    """Every all-gather of FSDP2 (dist.all_gather_single) and DeepSpeed (the function its comm
    backend bound at init) done by in_place_all_gather, for the allocator's view only: the timed
    rounds use gloo's own."""
    saved = dist.all_gather_single
    cdb = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
    saved_ds = getattr(cdb, "all_gather_function", None)
    dist.all_gather_single = in_place_all_gather
    if saved_ds is not None:
        cdb.all_gather_function = in_place_all_gather
    try:
        yield
    finally:
        dist.all_gather_single = saved
        if saved_ds is not None:
            cdb.all_gather_function = saved_ds


def worker(args) -> None:
    from tram_dist import TRAM, TRAMConfig
    from tram_dist.forward import causal_lm_forward

    begun, phases = time.perf_counter(), {}  # where a job's minutes go: set-up, memory views, warm-up, rounds

    def lap(name: str) -> None:
        phases[name] = time.perf_counter() - begun - sum(phases.values())

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    bf16 = args.dtype == "bf16"
    model = build_model(args.layers, torch.bfloat16 if bf16 else torch.float32)
    wrapped, optimizer = wrap(args.stack, model, bf16)
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=g)
    batch = dict(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids))
    cuda = torch.cuda.is_available()
    lap("setup")
    in_place = not args.gloo_all_gather and dist.get_backend() == "gloo"  # NCCL gathers in place itself
    base_step(wrapped, optimizer, batch)  # AdamW's state exists from here on, as past any first step
    # An AdamW step's memory, untimed (the profiler slows a step by about 40%, and the steps after
    # the first are slow anyway); its origin is the live memory between two steps.
    adamw_allocated, adamw_rss, adamw_rss_start = memory_peaks(lambda: base_step(wrapped, optimizer, batch), in_place)
    tram = TRAM(wrapped, optimizer, TRAMConfig(**METHODS[args.method]), forward_fn=causal_lm_forward)
    tram.step(batch)  # untimed: a snapshot target's first step has no target yet (it builds the snapshot)
    # The method's step's memory, from the same kind of origin (between two steps; a snapshot is
    # alive there, so in neither peak). Both come before the timed steps: those run with malloc
    # keeping what it frees, after which its heap is spread out and an RSS would count the holes.
    allocated, method_rss, method_rss_start = memory_peaks(lambda: tram.step(batch), in_place)
    lap("memory_views")
    keep_freed_memory(not args.fresh_malloc)
    for _ in range(args.warmup_rounds):  # untimed: malloc's heap grows to what the steps reuse from here
        tram.step(batch)
        base_step(wrapped, optimizer, batch)
    lap("warmup")
    timed = {"adamw": [], "method": []}  # timed_step's record of each step
    read_counts = []
    for _ in range(args.rounds):
        dist.barrier()
        with HostReads() as reads, timed_step(timed["method"], cuda):
            tram.step(batch)
        read_counts.append(len(reads.calls))
        dist.barrier()
        with timed_step(timed["adamw"], cuda):
            base_step(wrapped, optimizer, batch)
    lap("rounds")
    result = {
        "rank": rank, "stack": args.stack, "method": args.method, "layers": args.layers, "dtype": args.dtype,
        "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()),
        "peak_rss_bytes": method_rss, "adamw_rss_bytes": adamw_rss,
        "rss_start_bytes": method_rss_start, "adamw_rss_start_bytes": adamw_rss_start,
        "host_reads_per_step": read_counts,
        "allocated_peak_bytes": allocated, "adamw_allocated_peak_bytes": adamw_allocated,
        "weight_copy_bytes": weight_copy_bytes(args.stack, wrapped),
        "snapshot_bytes": tram.snapshot.nbytes() if tram.snapshot is not None else 0,
        "phases_s": phases,
    }
    for field in STEP_FIELDS:  # step_s, base_step_s (AdamW's), step_kernel_s, ...: one value per timed round
        result["step_" + field] = [step[field] for step in timed["method"]]
        result["base_step_" + field] = [step[field] for step in timed["adamw"]]
    if cuda:
        result.update(peak_allocated_bytes=max(s["gpu_peak"] for s in timed["method"]),
                      adamw_allocated_bytes=max(s["gpu_peak"] for s in timed["adamw"]))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    from tram_dist.shutdown import exit_run

    exit_run()


def memory_peaks(step, in_place: bool) -> tuple[int, int, int]:
    """(the CPU allocator's peak over the live bytes before it, peak RSS, RSS before it) of ``step``, from
    two calls: one in the allocator's view (tests/allocator.py's events; all-gathers in place, as
    NCCL's, where ``in_place``), then one alone (the profiler keeps records of its own), its peak
    RSS (VmHWM) reset to the current RSS first (/proc/self/clear_refs, Linux 4.0+). glibc's malloc
    is at its defaults and gives every free page back before each call, so that a step makes each
    of its tensors afresh and its RSS counts them."""
    keep_freed_memory(False)
    with Allocations() as mem, (gathers_in_place() if in_place else contextlib.nullcontext()):
        mem.mark("step")
        step()
    allocated = mem.peaks()["step"]
    del mem  # the profiler's records are not the RSS step's
    keep_freed_memory(False)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = status_bytes("VmRSS:")
    step()
    return allocated, status_bytes("VmHWM:"), start


def status_bytes(field: str) -> int:
    """A size from /proc/self/status (VmRSS:, VmHWM:)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


# mallopt's parameters (malloc.h) and the values glibc's dynamic thresholds settle at once tensors have come
# and gone (the mmap threshold rises to the largest freed mapping, at most 32 MB, the trim threshold to twice
# it); setting them fixes them there.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
GLIBC_DEFAULTS = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}


def keep_freed_memory(keep: bool) -> None:
    """glibc's malloc keeps what a step frees for the next (``keep``), as a GPU's caching allocator
    does, or gives it back to the kernel as it does by default (thresholds fixed where glibc's dynamic ones
    settle: GLIBC_DEFAULTS). By default every tensor of 32 MB or
    more is mapped afresh and unmapped when freed, so the kernel zeroes its pages again in every
    step: in perf's samples of a 2-rank TRAM-x run at this shape on FSDP2, clear_page took 43% of
    the machine's CPU time, the matmuls 26%; a TRAM-x step took 25-37 s, 11-17 s of it in the
    kernel (an AdamW step 11-15 s, 5-7 s). Kept (no mmap, no trimming; one arena, MALLOC_TUNABLES),
    once the heap had grown, a TRAM-x step took 19 s, 3.5 s in the kernel (AdamW 9.4 s, 0.8 s).
    The timed steps run kept; the memory steps don't, and give every free page back first
    (malloc_trim), so that their RSS is the step's own."""
    libc = ctypes.CDLL(None)
    settings = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1} if keep else GLIBC_DEFAULTS  # -1: never trim
    for param, value in settings.items():
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"mallopt({param}, {value}) failed")
    if not keep:
        libc.malloc_trim(0)


# What timed_step records of a step besides the GPU's peak: seconds of wall time, and this process's
# (getrusage, all threads) user and kernel seconds and page faults, and the machine's steal time.
STEP_FIELDS = ("s", "user_s", "kernel_s", "faults", "steal_s")


@contextlib.contextmanager
def timed_step(into: list, cuda: bool):
    """Appends a dict of the block's STEP_FIELDS and "gpu_peak" (the GPU allocator's peak, or 0). Faults
    say whether malloc's heap still grew in a timed step; kernel seconds also carry gloo's socket time
    (0.6-0.7 s of an AdamW step without faults here); user seconds of the same work vary with what else
    runs on the host (an AdamW step's 5.7-8.6 s here, docs/results.md); steal is the hypervisor's
    share (/proc/stat, both cores)."""
    if cuda:
        torch.cuda.synchronize()  # earlier work is not this step's
        torch.cuda.reset_peak_memory_stats()
    before, steal = resource.getrusage(resource.RUSAGE_SELF), steal_seconds()
    start = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    into.append({"s": seconds, "user_s": after.ru_utime - before.ru_utime, "kernel_s": after.ru_stime - before.ru_stime,
                 "faults": after.ru_minflt - before.ru_minflt, "steal_s": steal_seconds() - steal,
                 "gpu_peak": torch.cuda.max_memory_allocated() if cuda else 0})


def steal_seconds() -> float:
    """The machine's steal time so far, all CPUs (/proc/stat's first line, 8th value, in clock ticks)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")


def weight_copy_bytes(stack: str, wrapped) -> int:
    """TRAM's copy of theta while theta + e is loaded: the local shards on FSDP2, none on ZeRO-3."""
    if stack != "fsdp2":
        return 0
    return sum(p.to_local().numel() * p.element_size() for p in wrapped.parameters() if p.requires_grad)


def launch(stack: str, method: str, args) -> list[dict]:
    out = os.path.join(args.tmp, f"{stack}_{method}_{args.layers}_{args.dtype}")
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.abspath(__file__), "--worker", "--stack", stack,
           "--method", method, "--layers", str(args.layers), "--rounds", str(args.rounds), "--out", out,
           "--warmup-rounds", str(args.warmup_rounds), "--dtype", args.dtype]
    cmd += ["--gloo-all-gather"] if args.gloo_all_gather else []
    cmd += ["--fresh-malloc"] if args.fresh_malloc else []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{stack} {method} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
    phases = ", ".join(f"{k} {v:.0f}" for k, v in ranks[0]["phases_s"].items())
    print(f"{stack} {method}: {time.perf_counter() - start:.0f} s ({phases})", flush=True)
    return ranks


def records(ranks_by_method: dict[str, list[dict]]) -> list[dict]:
    """One row per (method, rank): peak memory over AdamW's in the same process, ratios with their range."""
    rows = []
    for method, ranks in ranks_by_method.items():
        for r in ranks:
            row = {k: r[k] for k in ("stack", "method", "layers", "rank", "params", "peak_rss_bytes", "adamw_rss_bytes",
                                     "rss_start_bytes", "adamw_rss_start_bytes")}
            row["dtype"] = r.get("dtype", "fp32")
            # Each step's growth over the RSS it started from: a snapshot, alive from the method's first
            # step on, is in the method's start and in neither growth, as in the allocator's view.
            extra = (r["peak_rss_bytes"] - r["rss_start_bytes"]) - (r["adamw_rss_bytes"] - r["adamw_rss_start_bytes"])
            row["extra_over_adamw_L"] = extra / L_BYTES
            # A snapshot is in neither growth (see above), so only the transient copy of theta is
            # TRAM's on the weight side, in both views.
            row["weight_copy_L"] = r["weight_copy_bytes"] / L_BYTES
            row["snapshot_L"] = r["snapshot_bytes"] / L_BYTES
            row["activation_extra_L"] = (extra - r["weight_copy_bytes"]) / L_BYTES
            alloc_extra = r["allocated_peak_bytes"] - r["adamw_allocated_peak_bytes"]
            row["allocated_extra_L"] = alloc_extra / L_BYTES
            row["allocated_logits_side_L"] = (alloc_extra - r["weight_copy_bytes"]) / L_BYTES
            if "peak_allocated_bytes" in r:
                row["extra_allocated_L"] = (r["peak_allocated_bytes"] - r["adamw_allocated_bytes"]) / L_BYTES
            row["step_time_ratio"], row["ratio_range"], row["fastest_ratio"] = ratios(zip(r["step_s"], r["base_step_s"]))
            row["base_step_s"] = statistics.median(r["base_step_s"])
            # Each round's (method, AdamW) seconds, so that runs pool, and the rest of timed_step's record
            # likewise (rounds_faults: a heap still growing shows there; rounds_user_s: the host's speed).
            for field in STEP_FIELDS:
                row["rounds_" + field] = [list(pair) for pair in zip(r["step_" + field], r["base_step_" + field])]
            row["host_reads_per_step"] = max(r["host_reads_per_step"])
            rows.append(row)
    return rows


def ratios(rounds) -> tuple[float, list[float], float]:
    """Of (method seconds, AdamW seconds) rounds: the median of the per-round ratios, their [min, max],
    and the fastest method step over the fastest AdamW step."""
    rounds = list(rounds)
    per_round = [t / b for t, b in rounds]
    fastest = min(t for t, _ in rounds) / min(b for _, b in rounds)
    return statistics.median(per_round), [min(per_round), max(per_round)], fastest


def row_order(stack: str, method: str) -> tuple[str, int]:
    """Rows and pooled lines by stack, then in METHODS' order."""
    return stack, list(METHODS).index(method)


def entry_key(args) -> str:
    """The results file's entry of a run: its depth, dtype and protocol (a rerun never mixes two protocols' rows)."""
    key = f"layers{args.layers}" + ("_bf16" if args.dtype == "bf16" else "")
    key += "_gloo_all_gather" if args.gloo_all_gather else ""
    return key + ("_fresh_malloc" if args.fresh_malloc else "")


def pooled(paths: list[str], key: str) -> str:
    """The step-time ratios of several runs' ``key`` entries, every timed round of each (stack, method)
    together: median and range over all of them, and the fastest method step over the fastest AdamW
    step; rank 0's (a round's ranks wait for each other)."""
    rounds: dict[tuple[str, str], list[list[float]]] = {}
    protocols = set()
    for path in paths:
        entry = json.load(open(path)).get(key)
        if entry is None or any("rounds_s" not in r for r in entry["rows"]):
            raise SystemExit(f"{path}: no entry {key!r} whose rows keep each round's seconds (rounds_s; older runs kept only "
                             "medians and ranges)")
        protocols.add(entry.get("timed_malloc"))
        for r in entry["rows"]:
            if r["rank"] == 0:
                rounds.setdefault((r["stack"], r["method"]), []).extend(r["rounds_s"])
    if len(protocols) > 1:
        raise SystemExit(f"{', '.join(paths)}: timed with different malloc protocols ({protocols}): not pooled")
    lines = [f"{key} of {', '.join(paths)}",
             "| stack | method | rounds | step / AdamW step, median (range) | fastest step / fastest AdamW step |",
             "|---|---|---|---|---|"]
    for (stack, method), pairs in sorted(rounds.items(), key=lambda kv: row_order(*kv[0])):
        median, (lo, hi), fastest = ratios(pairs)
        lines.append(f"| {stack} | {method} | {len(pairs)} | {median:.2f} ({lo:.2f}-{hi:.2f}) | {fastest:.2f} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = [f"L = one fp32 logits tensor of a rank's micro-batch = {L_BYTES / 1e6:.0f} MB",
             "extra over AdamW: the method step's RSS growth over its start minus AdamW's (peak RSS: absolute)",
             "| stack | layers | method | rank | peak RSS GB (AdamW's) | extra over AdamW (L) | of it TRAM's theta copy (L) "
             "| logits side (L) | allocator: extra, logits side (L) | step / AdamW step (range) | fastest / fastest "
             "| host reads / step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ratio_range"]
        layers = f"{r['layers']} bf16" if r.get("dtype") == "bf16" else r["layers"]
        lines.append(f"| {r['stack']} | {layers} | {r['method']} | {r['rank']} | {r['peak_rss_bytes'] / 1e9:.2f} "
                     f"({r['adamw_rss_bytes'] / 1e9:.2f})"
                     f"| {r['extra_over_adamw_L']:+.2f} | {r['weight_copy_L']:.2f} | {r['activation_extra_L']:+.2f} "
                     f"| {r['allocated_extra_L']:+.2f}, {r['allocated_logits_side_L']:+.2f} "
                     f"| {r['step_time_ratio']:.2f} ({lo:.2f}-{hi:.2f}) | {r['fastest_ratio']:.2f} "
                     f"| {r['host_reads_per_step']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stack", default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stacks", default=",".join(STACKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup-rounds", type=int, default=2,
                   help="untimed rounds before the timed ones, once malloc keeps what it frees")
    p.add_argument("--fresh-malloc", action="store_true",
                   help="time the steps with malloc giving freed memory back (every large tensor's pages zeroed "
                        "afresh by the kernel) instead of keeping it: less memory, for the full depth. Not the "
                        "protocol of the runs before 2026-12-03 (those trimmed before every timed step)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: the model in bf16 under DeepSpeed's bf16 (ZeRO-3 only); L stays an fp32 logits tensor")
    p.add_argument("--gloo-all-gather", action="store_true",
                   help="the allocator's view with gloo's all-gathers (a temporary of the output's size each) "
                        "instead of in place, as NCCL gathers")
    p.add_argument("--tmp", default="/tmp/tram_bench_llm")
    p.add_argument("--json", default=os.path.join(ROOT, "bench", "llm_results.json"))
    p.add_argument("--pool", nargs="+", metavar="JSON",
                   help="measure nothing: print the step-time ratios of these results files' rounds pooled "
                        "(the entry of --layers, --dtype and the protocol flags)")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.pool:
        return print(pooled(args.pool, entry_key(args)))
    if args.dtype == "bf16" and args.stacks != "zero3":
        p.error("--dtype bf16 runs on --stacks zero3 only (DeepSpeed's bf16; FSDP2 would need a mixed-precision policy)")
    methods = args.methods.split(",")
    rows, begun = [], time.perf_counter()
    for stack in args.stacks.split(","):
        start = time.perf_counter()
        rows += records({m: launch(stack, m, args) for m in methods})
        print(f"{stack}: {time.perf_counter() - start:.0f} s", flush=True)
    elapsed = time.perf_counter() - begun
    print(table(rows))
    print(f"{elapsed / 60:.1f} minutes")
    results = json.load(open(args.json)) if os.path.exists(args.json) else {}
    key = entry_key(args)
    today = time.strftime("%Y-%m-%d")
    for r in rows:
        r["date"] = today  # each row its own: a partial rerun keeps the others' rows
    measured = {(r["stack"], r["method"]) for r in rows}  # a partial rerun replaces only its own rows
    entry = results.get(key, {})
    protocol = "fresh" if args.fresh_malloc else "kept"
    if entry and entry.get("timed_malloc") != protocol:  # timed another way: none of its rows is kept
        print(f"{args.json}: entry {key!r} was timed another way ({entry.get('timed_malloc')}); replaced")
        entry = {}
    kept = [r for r in entry.get("rows", []) if (r["stack"], r["method"]) not in measured]
    results[key] = {"date": today, "command": " ".join(sys.argv), "L_bytes": L_BYTES,
                    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", MALLOC_TUNABLES),
                    "timed_malloc": protocol, "minutes": round(elapsed / 60, 1),
                    "rows": sorted(kept + rows, key=lambda r: (*row_order(r["stack"], r["method"]), r["rank"]))}
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
