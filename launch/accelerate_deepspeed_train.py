"""TRAM in an accelerate loop under DeepSpeed ZeRO-3: a tiny BERT classifier on random tokens.

    accelerate launch --config_file launch/accelerate_deepspeed_config.yaml launch/accelerate_deepspeed_train.py

accelerator.prepare returns the DeepSpeed engine; TRAM drives it (engine.backward for both
passes, one engine.step). Never call accelerator.backward in a TRAM step: under DeepSpeed it runs
engine.backward AND engine.step, which would update the weights between the two passes.
Only the main process prints, one line per step: "step S d=... grad_norm=... e_norm=... loss=...".
"""
import argparse
import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    # CPU only: skip DeepSpeed's ~100 s JIT build of a shared-memory op that training never uses.
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
from accelerate import Accelerator, DeepSpeedPlugin  # noqa: E402
from accelerate.utils import InitProcessGroupKwargs  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from tram_dist import TRAM, TRAMConfig  # noqa: E402
from tram_dist.shutdown import exit_run  # noqa: E402

BATCH, SEQ, VOCAB, CLASSES = 4, 16, 100, 3  # BATCH rows per process


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    ds_config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3}, "bf16": {"enabled": torch.cuda.is_available()},
                 "zero_allow_untested_optimizer": True}
    # On a CPU-only machine accelerate must be told to use gloo, or every process runs as rank 0 of 1.
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config), kwargs_handlers=handlers)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(f"launched {launched} processes, but accelerate sees {accelerator.num_processes}")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    engine, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    tram = TRAM(engine, None, TRAMConfig(target="noised_input", sigma=0.1, scale=100.0, rho_max=1.0))
    if accelerator.is_main_process:
        print(f"accelerate: {accelerator.num_processes} processes, {accelerator.distributed_type.value}, "
              f"{type(engine).__name__} ZeRO-{engine.zero_optimization_stage()}", flush=True)
    g = torch.Generator().manual_seed(1 + accelerator.process_index)  # each process draws its own rows
    for step in range(args.steps):
        batch = dict(input_ids=torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).to(accelerator.device),
                     labels=torch.randint(0, CLASSES, (BATCH,), generator=g).to(accelerator.device))
        m = tram.step(batch)
        if accelerator.is_main_process:
            print(f"step {step} d={m['d']:.4g} grad_norm={m['grad_norm']:.4g} "
                  f"e_norm={m['e_norm']:.4g} loss={m['loss']:.4f}", flush=True)
    # Not accelerator.end_training(): it destroys the process group, and over gloo (CPU) the interpreter
    # teardown after DeepSpeed can then abort. This script has no trackers to finish.
    exit_run()  # see tram_dist/shutdown.py


if __name__ == "__main__":
    main()
