"""The real HF Trainer on 2 gloo ranks (torchrun): TRAMTrainer, then TRAM's own steps on the same data.

    torchrun --nproc_per_node 2 tests/hf_worker.py --stack ddp|zero2|zero3 --out DIR

A tiny BERT classifier built from a config trains for one epoch with gradient accumulation 2:
20 examples, 2 per micro-batch per rank, so each rank's 5 micro-batches make windows of 2, 2
and 1 (the Trainer's short last window). The Trainer brings its own data loading, linear LR
schedule, max_grad_norm clipping and, for zero2/zero3, `deepspeed=<json file>`. Every
micro-batch training_step receives is recorded; then a fresh copy of the model, wrapped by hand
(DDP, or deepspeed.initialize), takes TRAM's own steps on the same windows with a hand-built
schedule and the same clipping. Each rank writes rank{r}.pt with both final weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stacks  # noqa: E402

from tram_dist.shutdown import exit_run  # noqa: E402

STEPS, LR, CLIP = 3, 1e-3, 0.4  # grad norms are 0.3-0.6: clipping bites on steps 2 and 3
TARGETS = {"noised_input": dict(target="noised_input", sigma=0.1, scale=100.0, rho_max=1.0),
           "previous": dict(target="previous", scale=1e4, rho_max=1.0)}


def make_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def make_data():
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": torch.randint(0, 64, (8,), generator=g), "labels": int(torch.randint(0, 3, (), generator=g))}
            for _ in range(20)]


def ds_config(stage: int) -> dict:
    """A user's ZeRO config with the HF "auto" values the Trainer fills; no optimizer block, so
    the Trainer's own torch AdamW and linear schedule go into the engine."""
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # every parameter really partitioned
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}


def run_trainer(args, deepspeed_file, name: str, save_steps: int = 0, resume_from=None):
    from tram_dist.hf import TRAMTrainer, TRAMTrainingArguments

    class Recording(TRAMTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            self.seen.append(({k: v.detach().clone() for k, v in inputs.items()}, self.accelerator.sync_gradients))
            return super().training_step(model, inputs, num_items_in_batch)

    hf_stack = dict(deepspeed=deepspeed_file, accelerator_config={"use_configured_state": True}) \
        if deepspeed_file else dict(use_cpu=True, ddp_backend="gloo")
    hf_args = TRAMTrainingArguments(
        output_dir=os.path.join(args.out, name), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        num_train_epochs=1, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=CLIP, optim="adamw_torch", logging_steps=1, report_to=[],
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
        **{f"tram_{k}": v for k, v in TARGETS[args.target].items()}, **hf_stack)
    trainer = Recording(model=make_model(), args=hf_args, train_dataset=make_data())
    trainer.seen = []
    trainer.train(resume_from_checkpoint=resume_from)
    windows, current = [], []
    for inputs, last in trainer.seen:
        current.append(inputs)
        if last:
            windows.append(current)
            current = []
    wrapped = trainer.model_wrapped  # what the Trainer's set-up made: DDP, or the DeepSpeed engine
    info = {"wrapped": type(wrapped).__name__, "backend": trainer.tram.backend.name,
            "world": trainer.accelerator.num_processes}
    if deepspeed_file:
        info.update(stage=wrapped.zero_optimization_stage(), gas=wrapped.gradient_accumulation_steps(),
                    clipping=wrapped.gradient_clipping())
    stack = args.stack if deepspeed_file else "ddp"
    return windows, stacks.full_state(stack, wrapped), trainer.state.log_history, info


def run_wrapper(args, windows, deepspeed_file):
    """TRAM's own steps, wrapped and scheduled by hand (no Trainer, no accelerate)."""
    from tram_dist import TRAM, TRAMConfig

    model = make_model()
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    # The Trainer's "linear" schedule without warm-up: lr * (T - s) / T over T optimizer steps.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, (STEPS - s) / STEPS))
    if deepspeed_file:
        import deepspeed

        with open(deepspeed_file) as f:
            cfg = json.load(f)
        cfg.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2, gradient_clipping=CLIP,
                   train_batch_size=2 * 2 * dist.get_world_size(), bf16={"enabled": False}, fp16={"enabled": False})
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=cfg)
        tram = TRAM(engine, None, TRAMConfig(**TARGETS[args.target]))  # the engine clips and steps the schedule
        for window in windows:
            tram.step(window)
        return stacks.full_state(args.stack, engine), init
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    tram = TRAM(ddp, optimizer, TRAMConfig(**TARGETS[args.target], max_grad_norm=CLIP))
    for window in windows:
        tram.step(window)
        schedule.step()
    return stacks.full_state("ddp", ddp), init


def fresh_state(deepspeed_file) -> None:
    """accelerate's process state for the next Trainer (one per Trainer: a second Accelerator
    cannot take a DeepSpeed plugin), on the gloo group.

    CPU only: with DeepSpeed the Trainer would build the state without a
    backend, and every rank would think it is rank 0 of 1; so build it on gloo first and let
    the Trainer use it (accelerator_config use_configured_state)."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    if deepspeed_file:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    else:
        PartialState(cpu=True, backend="gloo")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stack", choices=["ddp", "zero2", "zero3"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--target", choices=sorted(TARGETS), default="noised_input")
    p.add_argument("--resume", action="store_true",
                   help="also: a run saving at step 2, then a new Trainer resuming from that checkpoint")
    args = p.parse_args()
    deepspeed_file = None
    if args.stack.startswith("zero"):
        stacks.skip_deepspeed_shm_build()
        deepspeed_file = os.path.join(args.out, f"ds_{args.stack}.json")
        if int(os.environ["RANK"]) == 0:
            os.makedirs(args.out, exist_ok=True)
            with open(deepspeed_file, "w") as f:
                json.dump(ds_config(int(args.stack[-1])), f)
    fresh_state(deepspeed_file)
    dist.barrier()
    windows, trainer_state, logs, info = run_trainer(args, deepspeed_file, "trainer")
    wrapper_state, init = run_wrapper(args, windows, deepspeed_file)
    result = {"trainer": trainer_state, "wrapper": wrapper_state, "init": init, "logs": logs, "info": info,
              "windows": [len(w) for w in windows]}
    if args.resume:
        fresh_state(deepspeed_file)
        run_trainer(args, deepspeed_file, "saving", save_steps=2)
        checkpoint = os.path.join(args.out, "saving", "checkpoint-2")
        result["checkpoint_files"] = sorted(os.listdir(checkpoint))
        fresh_state(deepspeed_file)
        _, result["resumed"], result["resumed_logs"], _ = run_trainer(args, deepspeed_file, "resumed",
                                                                     resume_from=checkpoint)
    torch.save(result, os.path.join(args.out, f"rank{dist.get_rank()}.pt"))
    exit_run()  # over gloo no interpreter teardown: DeepSpeed's can abort (tram_dist/shutdown.py)


if __name__ == "__main__":
    main()
