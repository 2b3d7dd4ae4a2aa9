"""`make demo`: a short TRAM fine-tune on 2 ranks under DeepSpeed ZeRO-3, printing per-step metrics.

    python -m tram_dist.demo                 # launches itself on 2 ranks with torchrun
    python -m tram_dist.demo --steps 40 --config ds_configs/demo_zero3_fp32.json

The model is a small BERT built from a config (no download); the task is a synthetic sentiment
task it can learn in a few dozen steps: a sentence is positive when it holds more "positive"
tokens (ids 10-19) than "negative" ones (ids 20-29), among neutral filler.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DS_CONFIG = os.path.join(os.path.dirname(HERE), "ds_configs", "demo_zero3_fp32.json")
VOCAB, SEQ = 64, 16


def make_data(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(30, VOCAB, (n, SEQ), generator=g)
    pos = torch.randint(0, 4, (n,), generator=g)
    neg = torch.randint(0, 4, (n,), generator=g)
    neg = torch.where(neg == pos, (neg + 1) % 4, neg)
    for i in range(n):
        slots = torch.randperm(SEQ - 1, generator=g)[: pos[i] + neg[i]] + 1
        ids[i, slots[: pos[i]]] = torch.randint(10, 20, (int(pos[i]),), generator=g)
        ids[i, slots[pos[i]:]] = torch.randint(20, 30, (int(neg[i]),), generator=g)
    ids[:, 0] = 1  # [CLS]
    return {"input_ids": ids, "labels": (pos > neg).long()}


def build_model() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=SEQ, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def worker(args) -> None:
    # Skip the ~100 s JIT build of a shared-memory op only inference_all_reduce uses.
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import logging

    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)

    from tram_dist import TRAM, TRAMConfig

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with open(args.config) as f:
        ds_config = json.load(f)
    engine, *_ = deepspeed.initialize(model=build_model(), config=ds_config)
    tram = TRAM(engine, None, TRAMConfig(geometry="asam", target="noised_input", sigma=0.1, scale=10.0, rho_max=0.5))
    micro = ds_config["train_micro_batch_size_per_gpu"]
    data = make_data(args.steps * micro * world, seed=1)
    if rank == 0:
        print(f"TRAM (asam geometry, noised-input target) on {world} ranks, DeepSpeed ZeRO-{engine.zero_optimization_stage()}")
        print(f"{'step':>4} {'loss':>7} {'loss(θ+e)':>9} {'d_t':>9} {'||e||':>9} {'||g||':>7}")
    for step in range(args.steps):
        lo = (step * world + rank) * micro
        batch = {k: v[lo:lo + micro].to(engine.device) for k, v in data.items()}
        m = tram.step(batch)
        if rank == 0:
            print(f"{step:4d} {m['loss']:7.4f} {m['loss_perturbed']:9.4f} {m['d']:9.2e} {m['e_norm']:9.2e} {m['grad_norm']:7.3f}")
    test = make_data(512, seed=2)
    with torch.no_grad():
        logits = engine.module(input_ids=test["input_ids"].to(engine.device)).logits
    acc = (logits.argmax(-1).cpu() == test["labels"]).float().mean().item()
    if rank == 0:
        print(f"held-out accuracy after {args.steps} steps: {acc:.3f}")
    dist.barrier()
    dist.destroy_process_group()


def launch(args) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "tram_dist.demo", "--worker",
           "--steps", str(args.steps), "--config", args.config]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"))
    return subprocess.call(cmd, env=env)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--config", default=DEFAULT_DS_CONFIG, help="DeepSpeed JSON (default: ds_configs/demo_zero3_fp32.json)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
    else:
        sys.exit(launch(args))


if __name__ == "__main__":
    main()
