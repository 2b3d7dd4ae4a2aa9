"""TRAM with DistributedDataParallel: a tiny BERT classifier on random tokens.

    torchrun --nproc_per_node 2 examples/ddp.py
"""
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import BertConfig, BertForSequenceClassification

from tram_dist import TRAM, TRAMConfig

STEPS, BATCH, SEQ, VOCAB, CLASSES = 3, 4, 16, 100, 3  # BATCH rows per rank


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    tram = TRAM(ddp, torch.optim.AdamW(ddp.parameters(), lr=1e-3),
                TRAMConfig(target="noised_input", sigma=0.1, scale=100.0, rho_max=1.0))
    g = torch.Generator().manual_seed(1 + rank)  # each rank draws its own rows
    for step in range(STEPS):
        batch = dict(input_ids=torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).to(device),
                     labels=torch.randint(0, CLASSES, (BATCH,), generator=g).to(device))
        m = tram.step(batch)  # metrics are global: the same on every rank
        if rank == 0:
            print(f"step {step} d={m['d']:.4g} grad_norm={m['grad_norm']:.4g} "
                  f"e_norm={m['e_norm']:.4g} loss={m['loss']:.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
