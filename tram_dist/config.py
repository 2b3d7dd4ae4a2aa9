"""TRAMConfig: every TRAM setting in one validated dataclass (docs/settings.md, docs/how-it-works.md)."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Union

GEOMETRIES = ("sam", "asam", "fisher")
TARGETS = (None, "noised_input", "previous", "initial", "ema")
DIVERGENCES = ("forward", "reverse", "symmetric")
NOISES = ("normal", "uniform")
MODES = ("global", "micro")
SCOPES = ("global", "rank")

# Logits entries per chunk of the divergence: 2^21 (8 MB in float32, 16 MB per float64 temporary;
# 13 positions at a 152k vocabulary).
KL_CHUNK = 1 << 21

# The paper's baseline radius of each geometry (SAM rho 0.05, ASAM rho 0.5, FSAM gamma 0.1).
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5, "fisher": 0.1}


@dataclass
class TRAMConfig:
    """Settings of one TRAM (or plain SAM / ASAM / Fisher-SAM) optimizer.

    With ``target=None`` the radius is the fixed ``rho`` (SAM, ASAM, Fisher-SAM). With a target
    the radius is the trust-region divergence d_t = scale * KL(p_target || p_current), clamped
    at ``rho_max`` (TRAM). The paper's headline TRAM is ``geometry="asam", eta=0.0``.
    """

    geometry: str = "asam"
    """Shape of the ascent step e: "sam" (g/||g||), "asam" (T^2 g/||T g||), "fisher" ((g/f)/sqrt(sum g^2/f))."""
    target: Optional[str] = "noised_input"
    """Where p_target comes from: None (fixed radius rho), "noised_input", "previous", "initial", "ema"."""
    rho: Optional[float] = None
    """Fixed radius when target is None; None takes the paper's baseline of the geometry (0.05, 0.5, 0.1)."""
    eta: float = 0.0
    """ASAM's T = |theta| + eta (TRAM paper 0.0, Kwon et al. 0.01)."""
    eta_f: float = 0.1
    """Fisher geometry's f = 1 + eta_f * g^2."""
    divergence: str = "forward"
    """KL direction: "forward" KL(p_target||p_current), "reverse" KL(p_current||p_target), "symmetric" (their sum / 2)."""
    scale: Union[float, str] = 1.0
    """Multiplier on the mean KL before it is used as the radius. "auto": for the first auto_steps
    TRAM steps that measure a KL the radius is the geometry's baseline (rho, or the paper's), then
    the scale is fixed at baseline / median KL of those steps, so that their median radius would
    have been the baseline; it is global (every rank fixes the same from the step's one
    all-reduce), saved with TRAM's state and reported as the metric "kl_scale"."""
    auto_steps: int = 32
    """Steps scale="auto" calibrates over (TRAM steps with a measured KL: not a snapshot target's first).
    They should span the learning-rate warm-up and the early rise of the KL: fixed over the first 10
    of 64 steps (6 of them warm-up) the scale of the noised-input, initial-model and TRAM-Fisher
    targets came out 2-170x too large and their out-of-domain accuracy 0.02-0.06 lower; over 32,
    within one seed SD of a hand-set scale or better (docs/results.md)."""
    rho_max: Optional[float] = None
    """Optional upper clamp of the divergence radius."""
    radius_at_start: float = 0.0
    """Radius on a step whose target has no history yet ("previous" at step 0): 0 makes it a plain step."""
    sigma: float = 0.1
    """Input-embedding noise scale of the "noised_input" target (std or half-width); the paper gives none, 0.1 is R3F's."""
    noise: str = "normal"
    """Distribution of the input-embedding noise: "normal" N(0, sigma^2) or "uniform" U(-sigma, sigma)."""
    ema_decay: float = 0.99
    """Decay of the "ema" target: ema <- decay * ema + (1 - decay) * theta before each update."""
    seed: int = 0
    """Seed of the noise generator; rank r draws from its own generator seeded seed + r."""
    noised_pass: bool = False
    """TRAM-Fisher (2 forwards, 2 backwards; needs geometry "fisher" and target "noised_input"):
    pass 1 runs on noised input embeddings and its gradient gives the direction and the Fisher
    diagonal; the radius is KL(p(x+z; theta) || p(x; theta+e)) on the same batch, measured after
    pass 2 and used at the next step (radius_at_start at step 0). No separate target forward."""
    interval: int = 1
    """Take a TRAM step every interval-th optimizer step and a plain step (one pass) otherwise."""
    max_grad_norm: Optional[float] = None
    """Clip the descent gradient g' to this global norm with the backend's own clipping (DeepSpeed:
    set gradient_clipping in its config instead). A non-finite norm skips the update."""
    mode: str = "global"
    """"global": one perturbation per optimizer step from all micro-batches; "micro": one per
    micro-batch (m-sharpness; its own pass 1, all-reduce and pass 2), g' accumulated over them."""
    scope: str = "global"
    """"global": e from the gradient and KL of all ranks; "rank": from this rank's own (per-rank
    m-sharpness; local and DDP only: sharded parameters hold one perturbation for all ranks)."""
    eps: float = 1e-12
    """Guard added to every norm in a denominator."""
    kl_chunk: int = KL_CHUNK
    """Logits entries per chunk of the divergence (positions per chunk: max(1, kl_chunk // vocabulary));
    its temporaries are about 3 x kl_chunk float64 entries (48 MB at the default), whatever B and T are.
    On the CPU a chunk is at most 2^18 entries (faster there: its temporaries stay in cache)."""
    head_chunks: bool = True
    """Make the target's logits chunk by chunk through the output layer where the model has one (HF
    get_output_embeddings: causal and masked LMs) and the forward is a built-in one: they never exist whole."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def radius(self) -> float:
        """The fixed radius: rho, or the paper's baseline for the geometry when rho is None."""
        return DEFAULT_RHO[self.geometry] if self.rho is None else self.rho

    def validate(self) -> None:
        """Raise ValueError naming the field and the allowed values. Runs before any collective."""
        _choice("geometry", self.geometry, GEOMETRIES)
        _choice("target", self.target, TARGETS)
        _choice("divergence", self.divergence, DIVERGENCES)
        _choice("noise", self.noise, NOISES)
        _choice("mode", self.mode, MODES)
        _choice("scope", self.scope, SCOPES)
        if self.mode == "micro" and self.noised_pass:
            raise ValueError("TRAMConfig.mode='micro' with noised_pass=True (TRAM-Fisher) is not supported; "
                             "use mode='global'")
        auto = self.scale == "auto"
        if auto and self.target is None:
            raise ValueError("TRAMConfig.scale='auto' calibrates the KL's scale: it needs a target "
                             f"({[t for t in TARGETS if t]}), got target=None")
        for name in ("rho", "eta", "eta_f", "scale", "radius_at_start", "sigma", "eps", "rho_max", "ema_decay",
                     "max_grad_norm"):
            value = getattr(self, name)
            if name == "scale" and auto:
                continue
            if value is not None or name not in ("rho", "rho_max", "max_grad_norm"):
                setattr(self, name, _number(name, value, **_BOUNDS.get(name, {})))
        if not isinstance(self.noised_pass, bool):
            raise ValueError(f"TRAMConfig.noised_pass must be True or False, got {self.noised_pass!r}")
        if self.noised_pass and (self.geometry != "fisher" or self.target != "noised_input"):
            raise ValueError("TRAMConfig.noised_pass=True (TRAM-Fisher) needs geometry='fisher' and "
                             f"target='noised_input', got geometry={self.geometry!r}, target={self.target!r}")
        self.interval = _integer("interval", self.interval, low=1)
        self.auto_steps = _integer("auto_steps", self.auto_steps, low=1)
        self.kl_chunk = _integer("kl_chunk", self.kl_chunk, low=1)
        if not isinstance(self.head_chunks, bool):
            raise ValueError(f"TRAMConfig.head_chunks must be True or False, got {self.head_chunks!r}")
        self.seed = _integer("seed", self.seed)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for logs and checkpoints; TRAMConfig.from_dict inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TRAMConfig":
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TRAMConfig field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"TRAMConfig.{name} must be one of {list(allowed)}, got {value!r}")


# Bounds of the real-valued fields (default: a finite number >= 0).
_BOUNDS = {"ema_decay": dict(high=1.0, open_interval=True), "max_grad_norm": dict(open_interval=True)}


def _number(name: str, value: Any, low: float = 0.0, high: float = math.inf, open_interval: bool = False) -> float:
    """The value as a Python float: any real number (int, float, a numpy scalar) within the bounds."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        ok = low < float(value) < high if open_interval else low <= float(value) <= high
    if not ok:
        bounds = f"in ({low}, {high})" if open_interval else f">= {low}" + ("" if high == math.inf else f" and <= {high}")
        raise ValueError(f"TRAMConfig.{name} must be a finite number {bounds}, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, low: Optional[int] = None) -> int:
    """The value as a Python int: an int or an integer numpy scalar (not a bool, not 2.0)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and (low is None or value >= low):
        return int(value)
    raise ValueError(f"TRAMConfig.{name} must be an int" + ("" if low is None else f" >= {low}") + f", got {value!r}")
