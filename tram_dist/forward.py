"""Forward functions: how a batch becomes (loss, logits, mask) for TRAM.

A forward function is ``fn(model, batch) -> (loss, logits)`` or ``(loss, logits, mask)``:
loss is the batch-mean loss that gets a backward; logits are [..., C], one prediction per
leading position; mask (optional, shaped like the leading dims) marks the predictions that count
in the divergence's mean.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from torch import Tensor, nn

IGNORE_INDEX = -100


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


def default_forward(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """HF-style: ``model(**batch)`` returning ``.loss`` and ``.logits`` (or a (loss, logits) tuple).

    Every prediction counts (classification: one per example).
    """
    loss, logits = _loss_logits(_call(model, batch))
    return loss, logits, None


def causal_lm_forward(model: nn.Module, batch: Mapping) -> tuple[Tensor, Tensor, Tensor]:
    """A causal LM: position t predicts token t+1; it counts where label t+1 is not ignored
    and the attention mask of token t+1 is 1."""
    loss, logits = _loss_logits(_call(model, batch))
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    if batch.get("attention_mask") is not None:
        mask = mask & batch["attention_mask"][:, 1:].bool()
    return loss, logits[:, :-1], mask


def split_output(result) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Normalise a forward function's result to (loss, logits, mask)."""
    if len(result) == 2:
        return result[0], result[1], None
    if len(result) == 3:
        return result[0], result[1], result[2]
    raise ValueError(f"forward function must return (loss, logits) or (loss, logits, mask), got {len(result)} items")
