"""Count TRAM's device-to-host reads: torch's conversions of a tensor to Python values.

On a GPU each conversion (item, float, int, bool, tolist, numpy) stalls the stream. On CPU
nothing stalls, but the same calls can be counted: patched while counting, each call counts
when the first caller outside torch itself is tram_dist's code and the call does not come
from the base optimizer's step (torch.optim: AdamW reads its step counters). The model's own
reads (transformers checks its masks with bool() in every forward) and the optimizer's are the
same in an AdamW step: they are not TRAM's. Used by tests/test_llm_memory.py and bench/llm.py.
"""
from __future__ import annotations

import os
import sys

import torch

import tram_dist

TRAM_DIR = os.path.dirname(tram_dist.__file__)
TORCH_DIR = os.path.dirname(torch.__file__)
OPTIM_DIR = os.path.join(TORCH_DIR, "optim")
NAMES = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy")


class HostReads:
    """``with HostReads() as reads: ...``; then ``reads.calls`` lists "name at file:line"."""

    def __init__(self):
        self.calls: list[str] = []
        self._originals = {}

    def __enter__(self) -> "HostReads":
        for name in NAMES:
            original = self._originals[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)

    def _counting(self, name, original):
        def call(tensor, *args, **kwargs):
            frame, optimizer = sys._getframe(1), False
            while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
                optimizer = optimizer or frame.f_code.co_filename.startswith(OPTIM_DIR)
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(TRAM_DIR) and not optimizer:
                self.calls.append(f"{name} at {os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}")
            return original(tensor, *args, **kwargs)
        return call
