"""The target's logits a chunk at a time through the model's output layer (the LM head).

A causal LM's target forward needs p_target only inside the KL, one chunk of positions at a
time. HeadTap replaces the output layer's forward for the duration of that forward: the layer
receives the backbone's hidden states [B, T, H] as usual (its parameters gathered by whatever
hooks the stack has, ZeRO-3's and FSDP's included, once), computes the KL against the held
current logits a block of positions at a time, `layer(hidden[block])` each (16 of the
divergence's chunks: the largest target temporary is 16 x TRAMConfig.kl_chunk entries, 128 MB at
the default), and returns only the logits of the last position. The full [B, T, V] target logits never exist.

This is right only where the model uses the layer's output as its logits unchanged (Llama,
Qwen2, Mistral, GPT-2, BERT's masked LM head...). A model that post-processes them (Gemma-2's
soft-capping, a logit scale) would be measured on the wrong logits, so the first tapped forward
checks it: the model's returned logits must be the very tensor the tap returned (or equal to it).
If not, the tap turns itself off for good and TRAM takes the full target logits instead.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from . import divergence

# The head makes this many KL chunks' worth of positions at a time (module docstring of divergence).
HEAD_BLOCKS = 16


class HeadTap:
    """Chunked target logits through ``head`` (a row-wise output layer such as nn.Linear)."""

    def __init__(self, head: nn.Module):
        self.head = head
        self.verified = False  # set after the first forward shows the model returns the head's output
        self.disabled = False
        self._job: Optional[dict[str, Any]] = None

    @classmethod
    def find(cls, model: nn.Module) -> Optional["HeadTap"]:
        """A tap on the model's output embeddings (HF get_output_embeddings), or None."""
        getter = getattr(model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        return cls(head) if isinstance(head, nn.Module) else None

    @contextlib.contextmanager
    def measuring(self, current: Tensor, mask: Optional[Tensor], direction: str, chunk: int) -> Iterator[dict]:
        """Inside: a forward of the model measures the KL against ``current`` in the head.

        Yields a dict that holds "kl" = (sum, count) once the head has run."""
        job = {"current": current, "mask": mask, "direction": direction, "chunk": chunk}
        self._job = job
        original = self.head.forward
        own = self.head.__dict__.get("forward")  # a forward some library set on the instance (accelerate)

        def tapped(hidden: Tensor, *args, **kwargs) -> Tensor:
            return self._measure(original, hidden, *args, **kwargs)

        self.head.forward = tapped
        try:
            yield job
        finally:
            if own is None:
                del self.head.forward  # back to the class's forward
            else:
                self.head.forward = own
            self._job = None

    def _measure(self, original, hidden: Tensor, *args, **kwargs) -> Tensor:
        job = self._job
        current, mask = job["current"], job["mask"]
        if args or kwargs or hidden.shape[:-1] != current.shape[:-1]:
            job["probe"] = None  # not aligned with the current logits: the plain output, no KL here
            return original(hidden, *args, **kwargs)
        h, cur = divergence.as_rows(hidden), divergence.as_rows(current)
        m = None if mask is None else mask.reshape(cur.shape[:-1])
        # The head runs on blocks of HEAD_BLOCKS KL chunks: a matmul over a dozen rows would read
        # the whole [V, H] weight for each (memory-bound); 16 chunks' worth keeps it compute-bound.
        block = max(1, HEAD_BLOCKS * job["chunk"] // cur.shape[-1])
        total = count = torch.zeros((), dtype=torch.float64, device=cur.device)
        for b in range(h.shape[0]):
            for start in range(0, h.shape[1], block):
                rows = slice(start, start + block)
                kl_sum, kl_count = divergence.kl_sum_count(cur[b, rows], original(h[b, rows]), job["direction"],
                                                           None if m is None else m[b, rows], job["chunk"])
                total, count = total + kl_sum, count + kl_count
        job["kl"] = (total, count)
        job["probe"] = original(hidden[..., -1:, :])  # what the model returns as its logits
        return job["probe"]

    def accept(self, job: dict, output: Any) -> bool:
        """Whether the KL measured in ``job`` stands, given the model's ``output``.

        The first time, checks that the model returned the head's output unchanged (no host read
        when it is the same tensor); a model that changes it disables the tap."""
        if "kl" not in job:  # the head saw other positions than the logits have: never tap this model
            return self._disable("the output layer's input is not aligned with the model's logits")
        if self.verified:
            return True
        logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
        probe = job.get("probe")
        same = logits is probe or (isinstance(logits, Tensor) and logits.shape == probe.shape
                                   and bool(torch.equal(logits, probe)))
        if not same:
            return self._disable("the model changes its output layer's logits (soft-capping, a scale...)")
        self.verified = True
        return True

    def _disable(self, why: str) -> bool:
        self.disabled = True
        warnings.warn(f"TRAM: {why}; the divergence takes the full target logits instead of chunks "
                      "through the LM head")
        return False
