#!/usr/bin/env bash
# One GPU, a few minutes: what a TRAM step costs against AdamW's at LLM shapes, side by side.
#   bash bench/gpu_check.sh                    # both models; one JSON line per (model, method), then a table
#   DEVICE=cpu VOCAB=512 LAYERS=1 SEQ=32 BATCH=1 ROUNDS=1 WARMUP=1 bash bench/gpu_check.sh   # its code on the CPU, fp32
# Models, bf16 weights, random (built from configs, nothing downloaded):
#   qwen0.5b  Qwen2.5-0.5B's shape at full depth (vocabulary 151,936, 24 layers, tied), bench/llm.py's model
#   llama1.1b a 1.1B Llama (vocabulary 32,000, hidden 2,048, 16 layers)
# On one model and one fused AdamW, each round takes one step of every method in turn (AdamW, SAM,
# TRAM-x, TRAM-previous, TRAM-Fisher, with bench/llm.py's settings), so each ratio is to the AdamW
# step of its own round; it reports the median and range over the rounds. Memory: the allocator's
# peak in a step over its live memory before it, a method's over AdamW's, in L = one fp32 logits
# tensor of the batch (B x T x V x 4 bytes). Host syncs: torch.cuda.set_sync_debug_mode's
# reports in one more step of each method, those made from tram_dist's code (at most 1).
# Knobs (environment): PYTHON, DEVICE (cuda), MODELS (qwen0.5b,llama1.1b), ROUNDS (10), WARMUP (2
# untimed rounds first), BATCH (4), SEQ (2048), LAYERS and VOCAB (each model's own).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
export DEVICE="${DEVICE:-cuda}" MODELS="${MODELS:-qwen0.5b,llama1.1b}" ROUNDS="${ROUNDS:-10}" WARMUP="${WARMUP:-2}"
export BATCH="${BATCH:-4}" SEQ="${SEQ:-2048}" LAYERS="${LAYERS:-}" VOCAB="${VOCAB:-}"
cd "$ROOT"

exec "$PYTHON" - <<'EOF'
import json, os, statistics, sys, time, warnings

import torch

sys.path.insert(0, "bench")
import llm  # noqa: E402  (bench/llm.py: its model and each method's settings)

import tram_dist  # noqa: E402
from tram_dist import TRAM, TRAMConfig, causal_lm_forward  # noqa: E402

TRAM_DIR = os.path.dirname(tram_dist.__file__) + os.sep  # a sync reported from a frame in here is TRAM's

device = torch.device(os.environ["DEVICE"])
cuda = device.type == "cuda"
if cuda and not torch.cuda.is_available():
    sys.exit("bench/gpu_check.sh needs a CUDA GPU (DEVICE=cpu runs the same code at a toy size)")
rounds, warmup = int(os.environ["ROUNDS"]), int(os.environ["WARMUP"])
batch, seq = int(os.environ["BATCH"]), int(os.environ["SEQ"])
dtype = torch.bfloat16 if cuda else torch.float32  # bf16 on the CPU is slow and not what is measured here
layers = int(os.environ["LAYERS"]) if os.environ["LAYERS"] else None
vocab = int(os.environ["VOCAB"]) if os.environ["VOCAB"] else None


def build(name: str):
    if name == "qwen0.5b":
        return llm.build_model(layers or 24, dtype, vocab or llm.VOCAB, seq, device)
    if name != "llama1.1b":
        sys.exit(f"MODELS: unknown model {name!r}; allowed: qwen0.5b, llama1.1b")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab or 32_000, hidden_size=2048, intermediate_size=5632,
                         num_hidden_layers=layers or 16, num_attention_heads=16, num_key_value_heads=16,
                         max_position_embeddings=seq)
    with llm.building(dtype, device):
        return LlamaForCausalLM(config)


def sync():
    if cuda:
        torch.cuda.synchronize()


def allocated() -> int:
    return torch.cuda.memory_allocated() if cuda else 0


def measure(name: str) -> list[dict]:
    model = build(name)
    params, vocab_size = sum(p.numel() for p in model.parameters()), model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, seq), device=device, generator=g)
    data = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    trams = {m: TRAM(model, optimizer, TRAMConfig(**settings), forward_fn=causal_lm_forward)
             for m, settings in llm.METHODS.items()}

    def adamw():
        model(**data).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = {"adamw": adamw, **{m: (lambda t=t: t.step(data)) for m, t in trams.items()}}
    seconds = {m: [] for m in steps}
    peaks = {m: [] for m in steps}
    for r in range(warmup + rounds):  # untimed rounds first: kernels, allocator, optimizer state, snapshots
        for m, step in steps.items():
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            before = allocated()
            start = time.perf_counter()
            step()
            sync()
            if r >= warmup:
                seconds[m].append(time.perf_counter() - start)
                peaks[m].append((torch.cuda.max_memory_allocated() if cuda else 0) - before)
    syncs = {m: host_syncs(step) for m, step in steps.items()}
    L = batch * seq * vocab_size * 4
    rows = []
    for m in steps:
        ratios = [s / a for s, a in zip(seconds[m], seconds["adamw"])]
        rows.append({"model": name, "method": m, "params": params,
                     "device": torch.cuda.get_device_name() if cuda else "cpu", "batch": batch, "seq": seq,
                     "rounds": rounds, "step_s": statistics.median(seconds[m]), "ratio": statistics.median(ratios),
                     "ratio_range": [min(ratios), max(ratios)], "L_bytes": L,
                     "extra_peak_L": (max(peaks[m]) - max(peaks["adamw"])) / L if cuda else None,
                     "host_syncs": syncs[m][0], "host_syncs_tram": syncs[m][1]})
    del model, optimizer, trams, steps
    if cuda:
        torch.cuda.empty_cache()
    return rows


def host_syncs(step) -> tuple:
    """(all, tram_dist's) synchronizing calls torch reports in one step; None off a GPU."""
    if not cuda:
        return None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found = [w for w in caught if "synchroniz" in str(w.message)]
    return len(found), sum(w.filename.startswith(TRAM_DIR) for w in found)


rows = [row for name in os.environ["MODELS"].split(",") for row in measure(name)]
for row in rows:
    print(json.dumps(row), flush=True)
print(f"\n{rows[0]['device']}, {str(dtype).split('.')[-1]}, batch {batch} x {seq} tokens, {rounds} rounds; ratios to the AdamW step of "
      "the same round (median, range); peak over AdamW's in L = B x T x V x 4 bytes")
print("| model | params | method | step s | step / AdamW step (range) | extra peak (L) | host syncs (tram_dist's) |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    lo, hi = r["ratio_range"]
    extra = "-" if r["extra_peak_L"] is None else f"{r['extra_peak_L']:+.2f}"
    syncs = "-" if r["host_syncs"] is None else f"{r['host_syncs']} ({r['host_syncs_tram']})"
    print(f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['method']} | {r['step_s']:.3f} | {r['ratio']:.2f} "
          f"({lo:.2f}-{hi:.2f}) | {extra} | {syncs} |")
EOF
