"""The routes LLM fine-tuning takes, on 2 gloo ranks in one launch: the HF Trainer and TRL's
SFTTrainer with TRAM steps over windows of unequal-length sequences (token-weighted), gradient
checkpointing, packed sequences, DDP and DeepSpeed ZeRO-3.

    torchrun --nproc_per_node 2 tests/lm_trainer_worker.py --out DIR

Each route trains its own copy of a tiny causal LM for 3 steps (gradient accumulation 2, 2
sequences per micro-batch per rank) and records every micro-batch training_step receives, as the
collator made it, and the forwards of the model per step. Rank r writes rank{r}.pt: per route
the full final weights, the micro-batches of every rank (all-gathered), the logs (TRAM's
metrics of each step) and the forwards of the model per step. tests/test_lm_trainers.py compares them with a
single-process reference on the unpacked sequences.
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
from hf_worker import ds_config, fresh_state  # noqa: E402

from tram_dist.shutdown import exit_run  # noqa: E402

VOCAB, LR, STEPS, PER_DEVICE, GAS, WORLD = 64, 0.5, 3, 2, 2, 2
SEQUENCES = STEPS * PER_DEVICE * GAS * WORLD
SETTINGS = {"previous": dict(geometry="sam", target="previous", scale=30.0, rho_max=0.5, radius_at_start=0.05),
            "sam": dict(geometry="sam", target=None, rho=0.05)}
# route: (trainer, stack, settings, extra training arguments)
ROUTES = {  # DDP first: a DeepSpeed Trainer leaves process-wide state that a later DDP Trainer would pick up
    "trainer_ddp": ("trainer", "ddp", "previous", {}),
    "sft_ddp": ("sft", "ddp", "previous", {}),
    "sft_ddp_sam": ("sft", "ddp", "sam", {}),
    "sft_ddp_packed": ("sft", "ddp", "previous", {"padding_free": True, "max_length": None}),
    "sft_ddp_checkpointing": ("sft", "ddp", "previous", {"gradient_checkpointing": True}),
    "trainer_zero3_checkpointing": ("trainer", "zero3", "previous", {"gradient_checkpointing": True}),
    "sft_zero3": ("sft", "zero3", "previous", {}),
}


def make_model():
    """A tiny Llama, trained with plain SGD: AdamW divides each gradient entry by its own size, so
    entries that are zero up to rounding (a key bias: softmax ignores it) and the ~1e-6 relative
    rounding of a radius taken from fp32 logits would grow into updates far above the tolerance;
    SGD keeps a rounding difference in the gradient one in the weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=64, num_hidden_layers=2, tie_word_embeddings=True,
                                        max_position_embeddings=64, attention_dropout=0.0, use_cache=False))


def sequences() -> list[list[int]]:
    """Token ids of lengths 3 to 12 (id 0 is padding): windows of unequal token counts."""
    g = torch.Generator().manual_seed(11)
    lengths = torch.randint(3, 13, (SEQUENCES,), generator=g).tolist()
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def pad_collate(examples: list[dict]) -> dict:
    """Right padding to the longest sequence; labels -100 on padding."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, :len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def tokenizer():
    """A word-level tokenizer over the ids, built here (nothing downloaded): SFTTrainer wants one."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t1")),
                                   pad_token="t0", eos_token="t1", unk_token="t1")


def run_route(name: str, out: str) -> dict:
    kind, stack, settings, extra = ROUTES[name]
    from tram_dist.hf import TRAMTrainer, TRAMTrainingArguments

    deepspeed_file = None
    if stack == "zero3":
        deepspeed_file = os.path.join(out, "ds_zero3.json")
        if dist.get_rank() == 0:
            with open(deepspeed_file, "w") as f:
                json.dump(ds_config(3), f)
        dist.barrier()
    fresh_state(deepspeed_file)
    hf_stack = dict(deepspeed=deepspeed_file, accelerator_config={"use_configured_state": True}) \
        if deepspeed_file else dict(use_cpu=True, ddp_backend="gloo")
    common = dict(output_dir=os.path.join(out, name), per_device_train_batch_size=PER_DEVICE,
                  gradient_accumulation_steps=GAS, num_train_epochs=1, learning_rate=LR, lr_scheduler_type="constant",
                  weight_decay=0.0, max_grad_norm=0.0, optim="sgd", logging_steps=1, report_to=[],
                  save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0, bf16=False,
                  gradient_checkpointing=False,  # SFTConfig turns it on by default
                  **{f"tram_{k}": v for k, v in SETTINGS[settings].items()}, **hf_stack)
    data = [{"input_ids": s} for s in sequences()]
    if kind == "sft":
        from datasets import Dataset

        from tram_dist.trl import TRAMSFTConfig, TRAMSFTTrainer

        base, args = TRAMSFTTrainer, TRAMSFTConfig(**{"max_length": 64, **common, **extra})
        kwargs = dict(train_dataset=Dataset.from_list(data), processing_class=tokenizer())
    else:
        base, args = TRAMTrainer, TRAMTrainingArguments(**{**common, **extra})
        kwargs = dict(train_dataset=data, data_collator=pad_collate)

    class Recording(base):
        def training_step(self, model, inputs, num_items_in_batch=None):
            self.seen.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
            before = calls[0]
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.accelerator.sync_gradients:  # the window's TRAM step ran: its forwards of the model
                self.forwards.append(calls[0] - before)
            return loss

    model = make_model()
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    trainer = Recording(model=model, args=args, **kwargs)
    trainer.seen, trainer.forwards = [], []
    trainer.train()
    seen = [None] * WORLD
    dist.all_gather_object(seen, trainer.seen)
    return {"weights": stacks.full_state(stack, trainer.model_wrapped), "micro_batches": seen, "forwards": trainer.forwards,
            "logs": trainer.state.log_history, "backend": trainer.tram.backend.name,
            "checkpointing": trainer.accelerator.unwrap_model(trainer.model).is_activation_checkpointing}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--routes", default=",".join(ROUTES))
    args = p.parse_args()
    stacks.skip_deepspeed_shm_build()
    stacks.init_process_group("gloo")
    results = {name: run_route(name, args.out) for name in args.routes.split(",")}
    torch.save(results, os.path.join(args.out, f"rank{dist.get_rank()}.pt"))
    exit_run()


if __name__ == "__main__":
    main()
