"""A tiny model, data and methods shared by the unit and distributed tests (no downloads)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN, WIDTH, CLASSES, SEQ = 32, 8, 16, 3, 5
GLOBAL_BATCH = 8
LR = 1e-2
SGD_LR = 0.5  # bf16 runs use SGD: its update is linear in the gradient, so errors do not amplify

# Each method: the TRAMConfig fields it sets. Scales and sigmas make e large enough to matter.
METHODS = {
    "sam": dict(geometry="sam", target=None, rho=0.05),
    "asam": dict(geometry="asam", target=None, rho=0.5, eta=0.01),
    "fisher": dict(geometry="fisher", target=None, rho=0.1, eta_f=0.1),
    "tram_noised": dict(geometry="asam", target="noised_input", eta=0.0, sigma=0.5, scale=100.0, seed=7),
    "tram_previous": dict(geometry="asam", target="previous", eta=0.0, scale=100.0, radius_at_start=0.2),
    "tram_initial": dict(geometry="sam", target="initial", scale=100.0, rho_max=0.3),
    "tram_fisher": dict(geometry="fisher", target="noised_input", noised_pass=True, sigma=0.5, scale=100.0,
                        radius_at_start=0.1, seed=3),
    "tram_interval": dict(geometry="asam", target="previous", scale=100.0, radius_at_start=0.2, interval=2),
    "tram_ema": dict(geometry="fisher", target="ema", scale=100.0, ema_decay=0.5, divergence="symmetric"),
    # The baseline radius for 2 steps, then scale = 0.05 / median of their KLs.
    "tram_auto": dict(geometry="sam", target="noised_input", sigma=0.5, scale="auto", auto_steps=2, seed=5),
}


class TinyClassifier(nn.Module):
    """Embedding -> tanh(Linear) -> mean over tokens -> Linear; returns (loss, logits).

    451 parameters in 5 tensors: 2 ranks split some of them unevenly, and under FSDP1 with
    use_orig_params=True one rank holds no element of the last ones.
    """

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.fc1 = nn.Linear(HIDDEN, WIDTH)
        self.fc2 = nn.Linear(WIDTH, CLASSES)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids, labels):
        h = torch.tanh(self.fc1(self.embed(input_ids))).mean(dim=1)
        logits = self.fc2(h)
        return F.cross_entropy(logits.float(), labels), logits


def make_model(seed: int = 0) -> TinyClassifier:
    torch.manual_seed(seed)
    return TinyClassifier()


def make_batches(steps: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [dict(input_ids=torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g),
                 labels=torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)) for _ in range(steps)]


def shard(batch: dict, rank: int, world: int) -> dict:
    """This rank's contiguous slice of a global batch."""
    n = GLOBAL_BATCH // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def micro_batches(batch: dict, k: int) -> list[dict]:
    n = next(iter(batch.values())).shape[0] // k
    return [{key: v[i * n:(i + 1) * n] for key, v in batch.items()} for i in range(k)]
