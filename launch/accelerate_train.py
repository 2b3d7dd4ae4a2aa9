"""TRAM under `accelerate launch` (plain DDP): a tiny BERT classifier on random tokens.

    bash launch/accelerate.sh        # accelerate launch --config_file launch/accelerate_config.yaml

Only the main process prints, one line per step: "step S d=... grad_norm=... e_norm=... loss=...".
"""
import argparse
import os

import torch
from accelerate import Accelerator
from transformers import BertConfig, BertForSequenceClassification

from tram_dist import TRAM, TRAMConfig

BATCH, SEQ, VOCAB, CLASSES = 4, 16, 100, 3  # BATCH rows per process


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    # On a CPU-only machine a plain Accelerator() under torchrun runs every process as rank 0 of
    # 1; cpu=True makes the processes join one gloo group. On GPUs: nccl, one GPU per process.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # what the launcher started
    if accelerator.num_processes != launched:
        raise RuntimeError(f"launched {launched} processes, but accelerate sees {accelerator.num_processes}: "
                           "each would train alone")
    if accelerator.is_main_process:
        print(f"accelerate: {accelerator.num_processes} processes, {accelerator.distributed_type.value}", flush=True)
    torch.manual_seed(0)  # the same initial weights in every process
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    # model is now DDP and optimizer an AcceleratedOptimizer: TRAM drives both. tram.step runs
    # both backward passes itself (under DDP accelerator.backward would be loss.backward).
    tram = TRAM(model, optimizer, TRAMConfig(target="noised_input", sigma=0.1, scale=100.0, rho_max=1.0))
    g = torch.Generator().manual_seed(1 + accelerator.process_index)  # each process draws its own rows
    for step in range(args.steps):
        batch = dict(input_ids=torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).to(accelerator.device),
                     labels=torch.randint(0, CLASSES, (BATCH,), generator=g).to(accelerator.device))
        m = tram.step(batch)  # metrics are global: the same in every process
        if accelerator.is_main_process:
            print(f"step {step} d={m['d']:.4g} grad_norm={m['grad_norm']:.4g} "
                  f"e_norm={m['e_norm']:.4g} loss={m['loss']:.4f}", flush=True)
    accelerator.end_training()  # destroys the process group


if __name__ == "__main__":
    main()
