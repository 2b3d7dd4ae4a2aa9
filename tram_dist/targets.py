"""Where p_target comes from: noised input embeddings, or a sharded parameter snapshot."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn


class NoisedInput:
    """p_target = the current model on noised input embeddings (TRAM-x).

    A forward hook on the input-embedding layer returns its output plus z, with
    z ~ N(0, sigma^2) or U(-sigma, sigma), only inside ``active()``: the inputs are never
    mutated and the gradient passes never see noise. Rank r draws z from its own CPU
    generator seeded ``seed + r``, one draw of the embedding output's shape per target forward,
    so a run is reproducible and a single-process reference can draw the same noise.
    """

    def __init__(self, embedding: nn.Module, sigma: float, noise: str, seed: int, rank: int):
        self.sigma, self.noise = sigma, noise
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed + rank)
        self._on = False
        self._fired = False
        self._handle = embedding.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args, output: Tensor) -> Optional[Tensor]:
        if not self._on:
            return None
        self._fired = True
        # For a CUDA output the draw lands in pinned memory, so the copy to the device is asynchronous:
        # from pageable memory it would wait for the stream to drain (a host sync in every noised forward).
        pinned = output.is_cuda
        if self.noise == "normal":
            z = torch.randn(output.shape, generator=self.generator, pin_memory=pinned).mul_(self.sigma)
        else:
            z = torch.rand(output.shape, generator=self.generator, pin_memory=pinned).mul_(2).sub_(1).mul_(self.sigma)
        z = z.to(device=output.device, non_blocking=pinned)  # then the dtype, on the device
        return output + z.to(dtype=output.dtype)

    def check_fired(self) -> None:
        """Raise unless the embedding layer ran (and got noise) since the last check."""
        fired, self._fired = self._fired, False
        if not fired:
            raise ValueError("target='noised_input': the input-embedding layer never ran in the noised forward, "
                             "so no noise was added and kl = d = 0 (a batch with inputs_embeds?): pass input_ids, "
                             "or embedding=<the nn.Module whose output gets the noise>")

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self._on = True
        try:
            yield
        finally:
            self._on = False

    def remove(self) -> None:
        self._handle.remove()


class Snapshot:
    """p_target = the model with snapshot parameters: "previous", "initial" or "ema".

    Holds one fp32 tensor per local piece, so it is sharded exactly as the model is. The target
    forward loads it into the same module (no second model instance). ``before_update`` runs
    right before each optimizer update with theta restored:
      previous: snapshot <- theta           (at step t it holds theta_{t-1})
      initial:  taken once, at the first step (the pre-trained weights)
      ema:      snapshot <- decay * snapshot + (1 - decay) * theta, starting from theta_0
    """

    def __init__(self, kind: str, decay: float):
        self.kind, self.decay = kind, decay
        self.tensors: Optional[list[Tensor]] = None

    @property
    def has_history(self) -> bool:
        return self.tensors is not None

    @torch.no_grad()
    def start(self, thetas: Sequence[Tensor]) -> None:
        """Called at the first step: "initial" and "ema" start from theta_0, "previous" has no history."""
        if self.kind in ("initial", "ema") and self.tensors is None:
            self.tensors = [t.detach().float().clone() for t in thetas]

    @torch.no_grad()
    def before_update(self, thetas: Sequence[Tensor]) -> None:
        if self.kind == "previous":
            if self.tensors is None:
                self.tensors = [t.detach().float().clone() for t in thetas]
            else:
                for s, t in zip(self.tensors, thetas, strict=True):
                    s.copy_(t)
        elif self.kind == "ema":
            for s, t in zip(self.tensors, thetas, strict=True):
                s.lerp_(t.float(), 1.0 - self.decay)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors or [])
