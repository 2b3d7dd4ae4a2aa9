"""LoRA adapters (a real peft model) under TRAM on 2 ranks: DDP, ZeRO-3 and FSDP2 in one launch.

Each stack trains its own copy of the same tiny causal LM with LoRA (r=4 on q_proj and v_proj)
for 3 TRAM steps on this rank's half of each global batch, with the settings docs/trainer-and-cli.md recommends
for adapters (geometry "sam") and a "previous" target; rank results: the full weights and the
metrics. tests/test_peft.py compares them with a single-process reference on the full batch.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stacks  # noqa: E402

from tram_dist import TRAM, TRAMConfig  # noqa: E402
from tram_dist.forward import causal_lm_forward  # noqa: E402
from tram_dist.shutdown import exit_run  # noqa: E402

SETTINGS = dict(geometry="sam", target="previous", scale=30.0, rho_max=0.5, radius_at_start=0.05)
LR, STEPS, BATCH, SEQ, VOCAB = 1e-2, 3, 4, 12, 64


def lora_lm():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64, num_hidden_layers=2, tie_word_embeddings=True,
                                         max_position_embeddings=SEQ, attention_dropout=0.0))
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


def global_batches():
    """Equal-length sequences, every token a label: each rank's mean loss weighs its tokens as the
    full batch's mean does."""
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        out.append(dict(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids)))
    return out


def wrap(stack: str, model):
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    if stack == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
        return ddp, torch.optim.AdamW(trainable(ddp), lr=LR)
    if stack == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model, torch.optim.AdamW(trainable(model), lr=LR)
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable(model), lr=LR), config={
        "train_micro_batch_size_per_gpu": BATCH // 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True})
    return engine, None


def full_weights(stack: str, wrapped) -> dict:
    if stack == "ddp":
        return {n: p.detach().clone() for n, p in wrapped.module.named_parameters()}
    if stack == "fsdp2":
        return {n: p.full_tensor().detach().clone() for n, p in wrapped.named_parameters()}
    import deepspeed

    params = list(wrapped.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {n: p.detach().clone() for n, p in params}


def run(stack: str, rank: int, world: int) -> dict:
    wrapped, optimizer = wrap(stack, lora_lm())
    tram = TRAM(wrapped, optimizer, TRAMConfig(**SETTINGS), forward_fn=causal_lm_forward)
    metrics = []
    for batch in global_batches():
        half = BATCH // world
        m = tram.step({k: v[rank * half:(rank + 1) * half] for k, v in batch.items()})
        metrics.append({k: float(v) for k, v in m.items()})
    return {"weights": full_weights(stack, wrapped), "metrics": metrics}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stacks", default="ddp,zero3,fsdp2")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    stacks.init_distributed("zero3")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {stack: run(stack, rank, world) for stack in args.stacks.split(",")}
    torch.save(results, os.path.join(args.out, f"rank{rank}.pt"))
    exit_run()


if __name__ == "__main__":
    main()
