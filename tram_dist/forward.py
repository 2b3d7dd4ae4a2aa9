"""Forward functions: how a batch becomes (loss, logits, mask) for TRAM.

A forward function is ``fn(model, batch) -> (loss, logits)`` or ``(loss, logits, mask)``:
loss is the batch-mean loss that gets a backward; logits are [..., C], one prediction per
leading position; mask (optional, shaped like the leading dims) marks the predictions that count
in the divergence's mean.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100


def returns_model_logits(fn):
    """Mark a forward function whose logits are the model's own output logits, unchanged: for such
    a function TRAM may make the target's logits chunk by chunk through the LM head (tram_dist.head)."""
    fn.returns_model_logits = True
    return fn


def _call(model: nn.Module, batch: Any):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _loss_logits(out) -> tuple[Tensor, Tensor]:
    if hasattr(out, "loss") and hasattr(out, "logits"):
        return out.loss, out.logits
    return out[0], out[1]


@returns_model_logits
def default_forward(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """HF-style: ``model(**batch)`` returning ``.loss`` and ``.logits`` (or a (loss, logits) tuple).

    Every prediction counts (classification: one per example).
    """
    loss, logits = _loss_logits(_call(model, batch))
    return loss, logits, None


@returns_model_logits
def causal_lm_forward(model: nn.Module, batch: Mapping) -> tuple[Tensor, Tensor, Tensor]:
    """A causal LM: position t predicts token t+1; it counts where label t+1 is not ignored
    and the attention mask of token t+1 is 1 (see next_token_mask). The logits are returned
    whole, [B, T, V], aligned with the model's positions (no shifted copy or view)."""
    loss, logits = _loss_logits(_call(model, batch))
    return loss, logits, next_token_mask(batch["labels"], batch.get("attention_mask"))


def next_token_mask(labels: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """[B, T] bool: position t counts when label t+1 is not ignored (and token t+1 is attended to);
    the last position predicts nothing."""
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    if attention_mask is not None:
        mask[:, :-1] &= attention_mask[:, 1:].bool()
    return mask


def split_output(result) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Normalise a forward function's result to (loss, logits, mask)."""
    if len(result) == 2:
        return result[0], result[1], None
    if len(result) == 3:
        return result[0], result[1], result[2]
    raise ValueError(f"forward function must return (loss, logits) or (loss, logits, mask), got {len(result)} items")
