#!/usr/bin/env bash
# One GPU, under 5 minutes: TRAM-x against AdamW on a ~1.1B-parameter Llama built from a config, bf16.
#   bash bench/gpu_check.sh                 # prints one JSON line per method, then the ratios
# Knobs (environment): PYTHON, STEPS (timed steps per method), BATCH, SEQ.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
export STEPS="${STEPS:-10}" BATCH="${BATCH:-4}" SEQ="${SEQ:-512}"
cd "$ROOT"

exec "$PYTHON" - <<'EOF'
import json, os, time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tram_dist import TRAM, TRAMConfig, causal_lm_forward

assert torch.cuda.is_available(), "bench/gpu_check.sh needs a CUDA GPU"
steps, batch, seq = int(os.environ["STEPS"]), int(os.environ["BATCH"]), int(os.environ["SEQ"])
cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=seq)
g = torch.Generator(device="cuda").manual_seed(0)
ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda", generator=g)
data = {"input_ids": ids, "labels": ids}


def measure(method: str) -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    tram = None
    if method != "adamw":
        tram = TRAM(model, optimizer, TRAMConfig(target="noised_input", sigma=0.1, scale=250.0, rho_max=1.0),
                    forward_fn=causal_lm_forward)

    def step():
        if tram is None:
            model(**data).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            tram.step(data)

    for _ in range(3):  # warm-up: kernels, allocator, optimizer state
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    out = {"method": method, "params": sum(p.numel() for p in model.parameters()),
           "step_s": (time.perf_counter() - start) / steps, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    # Host syncs of one more step: torch reports each synchronizing call; count those made from
    # tram_dist's own code (the model's and the optimizer's are not TRAM's). docs/how-it-works.md: at most 1.
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    out["host_syncs"] = len(syncs)
    out["host_syncs_tram"] = sum("tram_dist" in w.filename for w in syncs)
    del model, optimizer, tram
    torch.cuda.empty_cache()
    return out


results = [measure("adamw"), measure("tram_x")]
for r in results:
    print(json.dumps(r), flush=True)
base, tram = results
print(f"{torch.cuda.get_device_name()}: {base['params'] / 1e9:.2f}B params, bf16, batch {batch} x {seq} tokens; "
      f"TRAM-x / AdamW step time {tram['step_s'] / base['step_s']:.2f}x, "
      f"peak memory {tram['peak_gib']:.1f} / {base['peak_gib']:.1f} GiB "
      f"(+{tram['peak_gib'] - base['peak_gib']:.2f} GiB)")
EOF
