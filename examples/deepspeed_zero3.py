"""TRAM driving a DeepSpeed ZeRO-3 engine: a tiny BERT classifier on random tokens.

    torchrun --nproc_per_node 2 examples/deepspeed_zero3.py
"""
import importlib
import sys

import torch

if not torch.cuda.is_available():
    # CPU only: skip DeepSpeed's ~100 s JIT build of a shared-memory op that training never uses.
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
import deepspeed  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from tram_dist import TRAM, TRAMConfig  # noqa: E402
from tram_dist.shutdown import exit_run  # noqa: E402

STEPS, BATCH, SEQ, VOCAB, CLASSES = 3, 4, 16, 100, 3  # BATCH rows per rank


def main() -> None:
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ds_config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,  # N: pass tram.step a list of N micro-batches
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": cuda},  # bf16 or fp32 (fp16 works on ZeRO 1-3)
        "zero_allow_untested_optimizer": True,  # a client torch optimizer under ZeRO
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=ds_config)
    # No base optimizer: TRAM drives the engine (backward twice, then engine.step()).
    tram = TRAM(engine, None, TRAMConfig(target="noised_input", sigma=0.1, scale=100.0, rho_max=1.0))
    rank = engine.global_rank
    g = torch.Generator().manual_seed(1 + rank)  # each rank draws its own rows
    for step in range(STEPS):
        batch = dict(input_ids=torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).to(engine.device),
                     labels=torch.randint(0, CLASSES, (BATCH,), generator=g).to(engine.device))
        m = tram.step(batch)  # e is written into each rank's ZeRO-3 partition (p.ds_tensor)
        if rank == 0:
            print(f"step {step} d={m['d']:.4g} grad_norm={m['grad_norm']:.4g} "
                  f"e_norm={m['e_norm']:.4g} loss={m['loss']:.4f}", flush=True)
    exit_run()  # over gloo (CPU) DeepSpeed's interpreter teardown can abort; see tram_dist/shutdown.py


if __name__ == "__main__":
    main()
