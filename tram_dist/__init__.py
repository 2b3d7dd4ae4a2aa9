"""tram_dist: TRAM (Trust Region Aware Minimization) for sharded fine-tuning.

    from tram_dist import TRAM, TRAMConfig
    tram = TRAM(model, torch.optim.AdamW(model.parameters(), lr=2e-5), TRAMConfig(target="noised_input"))
    for batch in loader:
        metrics = tram.step(batch)
"""
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TRAMConfig
from .forward import causal_lm_forward, default_forward
from .optimizer import TRAM

__all__ = ["TRAM", "TRAMConfig", "causal_lm_forward", "default_forward", "load_checkpoint", "save_checkpoint"]
__version__ = "0.1.0"
