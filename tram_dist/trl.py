"""TRAM inside TRL's SFTTrainer: TRAMSFTTrainer and TRAMSFTConfig.

    from tram_dist.trl import TRAMSFTConfig, TRAMSFTTrainer

    args = TRAMSFTConfig(output_dir="out", gradient_accumulation_steps=4, tram_geometry="sam",
                         tram_target="previous", tram_scale=100.0, tram_rho_max=0.05)
    TRAMSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()

Everything SFTTrainer does to the data stays (chat templates, completion-only and assistant-only
labels, packing, padding-free batches, PEFT), and so do its logs. What changes is the step, as in
TRAMTrainer (tram_dist.hf): each TRAM forward of the model runs once. SFTTrainer's own loss runs
the backbone through a fused LM head that never builds the logits, then, when the logits are asked
for, a second forward; TRAM needs the logits (the divergence), so its pass 1 and pass 2 take the
model's own loss and logits in one forward (the Trainer's compute_loss, token-weighted over the
window as SFTTrainer weighs it), the target forward computes logits only, and the entropy, token
accuracy and token count SFTTrainer logs come from pass 1 alone (one all-reduce per log).
A TRAM step therefore runs 3 forwards of the model per micro-batch (2 for SAM), where SFTTrainer
under TRAMTrainer would run 6.

loss_type "dft" reweighs each token by its probability inside SFTTrainer's fused head: not
supported under TRAM (ValueError at construction); "nll" is.
"""
from __future__ import annotations

import torch
from transformers import Trainer
from trl import SFTConfig, SFTTrainer

from .forward import returns_model_logits
from .hf import TRAMTrainer, with_tram_fields
from .versions import require

TRAMSFTConfig = with_tram_fields(SFTConfig, "TRAMSFTConfig", __name__)


class TRAMSFTTrainer(TRAMTrainer, SFTTrainer):
    """TRL's SFTTrainer whose optimizer step is a TRAM step (module docstring); ``tram_config`` and
    ``tram_forward`` as in TRAMTrainer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        require("trl", "SFTTrainer's metric store (_metrics, _total_train_tokens)",
                hasattr(self, "_metrics") and hasattr(self, "_total_train_tokens"))
        if self.use_tram and self.args.loss_type != "nll":
            raise ValueError(f"loss_type={self.args.loss_type!r}: TRAMSFTTrainer takes loss_type='nll' (the model's "
                             "own token loss, from the logits TRAM's divergence needs)")
        self._sft_sums: list[torch.Tensor] = []  # per micro-batch of pass 1: entropy sum, correct, counted, tokens

    @returns_model_logits
    def _forward(self, module, inputs):
        if self.tram.forward_role == "target":  # the divergence's target: logits only, no loss, no metrics
            outputs = module(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
            return torch.zeros((), device=outputs.logits.device), outputs.logits
        loss, logits, mask = super()._forward(module, inputs)
        if self.tram.forward_role == "pass1":
            self._sft_sums.append(_token_stats(logits.detach(), mask, inputs, self.tram.config.kl_chunk))
        return loss, logits, mask

    def _compute_loss(self, module, inputs):
        # The Trainer's compute_loss: the model's own loss and logits in one forward (not SFTTrainer's).
        return Trainer.compute_loss(self, module, {**inputs, "use_cache": False}, return_outputs=True,
                                    num_items_in_batch=self._num_items)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._sft_sums and "loss" in logs:  # a training log: every rank logs at the same steps
            entropy, correct, counted, tokens = self.accelerator.reduce(torch.stack(self._sft_sums).sum(0),
                                                                        reduction="sum").tolist()
            self._sft_sums.clear()
            metrics = self._metrics["train"]
            metrics["entropy"].append(entropy / counted if counted > 0 else 0.0)
            metrics["mean_token_accuracy"].append(correct / counted if counted > 0 else 0.0)
            self._total_train_tokens += int(tokens)
            metrics["num_tokens"] = [self._total_train_tokens]
        super().log(logs, *args, **kwargs)


def _token_stats(logits: torch.Tensor, mask: torch.Tensor, inputs: dict, chunk: int) -> torch.Tensor:
    """[entropy sum, top-1 correct, positions counted, tokens] of one micro-batch, on the device:
    over the positions the divergence counts (``mask``: the next token's label counts), at most
    max(1, chunk // vocabulary) positions at a time, as the divergence takes them (never a
    full-vocabulary float32 copy of the logits)."""
    target = inputs["labels"].roll(-1, dims=-1)  # position t predicts token t+1 (the last: masked)
    flat, target, mask = logits.reshape(-1, logits.shape[-1]), target.reshape(-1), mask.reshape(-1)
    rows = max(1, chunk // logits.shape[-1])
    sums = torch.zeros(4, dtype=torch.float64, device=logits.device)
    for start in range(0, flat.shape[0], rows):
        part, keep = flat[start:start + rows], mask[start:start + rows]
        logp = torch.log_softmax(part.float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        sums[0] += entropy[keep].sum().double()
        sums[1] += (part.argmax(-1) == target[start:start + rows])[keep].sum()
        sums[2] += keep.sum()
    if "attention_mask" in inputs:
        sums[3] += inputs["attention_mask"].sum()
    else:  # padding-free: one row of packed sequences
        sums[3] += inputs["position_ids"].shape[-1]
    return sums
