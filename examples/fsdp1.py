"""TRAM with FSDP1 (FullyShardedDataParallel): a tiny BERT classifier on random tokens.

    torchrun --nproc_per_node 2 examples/fsdp1.py
"""
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers import BertConfig, BertForSequenceClassification
from transformers.models.bert.modeling_bert import BertLayer

from tram_dist import TRAM, TRAMConfig

STEPS, BATCH, SEQ, VOCAB, CLASSES = 3, 4, 16, 100, 3  # BATCH rows per rank


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    # One FSDP unit per transformer layer plus the root; each rank keeps 1/world of every unit.
    fsdp = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({BertLayer}), device_id=device,
                sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=True)
    tram = TRAM(fsdp, torch.optim.AdamW(fsdp.parameters(), lr=1e-3),
                TRAMConfig(target="noised_input", sigma=0.1, scale=100.0, rho_max=1.0))
    g = torch.Generator().manual_seed(1 + rank)  # each rank draws its own rows
    for step in range(STEPS):
        batch = dict(input_ids=torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).to(device),
                     labels=torch.randint(0, CLASSES, (BATCH,), generator=g).to(device))
        m = tram.step(batch)  # e is written into each rank's own shard, in place
        if rank == 0:
            print(f"step {step} d={m['d']:.4g} grad_norm={m['grad_norm']:.4g} "
                  f"e_norm={m['e_norm']:.4g} loss={m['loss']:.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
