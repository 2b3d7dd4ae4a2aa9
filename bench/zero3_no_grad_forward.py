"""DeepSpeed ZeRO-3 alone (no tram_dist): a no-grad forward between a forward and its backward
raises the step's peak by the decoder layers' gathered weights.

    torchrun --nproc_per_node 2 bench/zero3_no_grad_forward.py [--layers 2]

Each rank trains a causal LM of hidden 896 / intermediate 4,864 (Qwen2.5-0.5B's width; vocabulary
32,000, 512 tokens) under ZeRO-3 and reports, in the CPU allocator's view (tests/allocator.py), the
peak of a plain step and of the same step with `engine.module(...)` under no_grad between the
forward and the backward (what TRAM's target forward is). Measured here (DeepSpeed 0.19.8):
582.7 against 701.9 MB with 2 layers (+119.2 MB: both layers' full fp32 weights, 59.6 MB each),
821.3 against 1059.8 MB with 4 (+238.5 MB).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from allocator import Allocations  # noqa: E402
from stacks import skip_deepspeed_shm_build  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args()
    skip_deepspeed_shm_build()
    import deepspeed
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dist.init_process_group("gloo")
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    vocab, seq = 32_000, 512
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                                         intermediate_size=4864, num_hidden_layers=args.layers,
                                         tie_word_embeddings=True, max_position_embeddings=seq))
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5), config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True})
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(dist.get_rank()))
    batch = dict(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids))

    def step(no_grad_forward: bool) -> None:
        loss = engine(**batch).loss
        if no_grad_forward:
            with torch.no_grad():
                engine.module(input_ids=ids, attention_mask=batch["attention_mask"])
        engine.backward(loss)
        engine.step()

    for no_grad_forward in (False, True):
        step(no_grad_forward)  # past the first step of each kind: DeepSpeed's trace is recorded
        with Allocations() as mem:
            mem.mark("step")
            step(no_grad_forward)
        if dist.get_rank() == 0:
            print(f"layers {args.layers}, no-grad forward in between: {no_grad_forward}: "
                  f"peak {mem.peaks()['step'] / 1e6:.1f} MB", flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
