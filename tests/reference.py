"""A single-process TRAM written by hand from the paper's rules (docs/how-it-works.md), not with tram_dist.

It trains TinyClassifier on the FULL global batch; a distributed run on per-rank slices must
end at the same weights. The only thing it shares with tram_dist is the documented noise
scheme: rank r draws its noise from a CPU generator seeded seed + r, one draw of the embedding
output's shape per micro-batch, so the reference concatenates the draws in data order.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from tiny import GLOBAL_BATCH, HIDDEN, LR, SEQ, SGD_LR, make_batches, make_model

EPS = 1e-12


def _logits(model, input_ids, z=None):
    h = model.embed(input_ids)
    if z is not None:
        h = h + z
    return model.fc2(torch.tanh(model.fc1(h)).mean(dim=1))


def kl_per_prediction(clean, target, direction="forward"):
    """KL(p_target || p_clean) ("forward"), its reverse or their mean, per prediction (over the last dim)."""
    # float64, as tram_dist takes it: in float32 the KL itself is off by ~1e-5 relative, which a
    # scale of 100 turns into a radius error larger than the tests' tolerance on d.
    lp_c, lp_t = F.log_softmax(clean.double(), -1), F.log_softmax(target.double(), -1)
    fwd = (lp_t.exp() * (lp_t - lp_c)).sum(-1)
    rev = (lp_c.exp() * (lp_c - lp_t)).sum(-1)
    return {"forward": fwd, "reverse": rev, "symmetric": (fwd + rev) / 2}[direction]


def _e(geometry, thetas, grads, r, eta, eta_f):
    """e per parameter with the global norm over all of them (sam, asam, fisher as in rules.py's table)."""
    if geometry == "sam":
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        return [r * g / (norm + EPS) for g in grads]
    if geometry == "asam":
        ts = [th.abs() + eta for th in thetas]
        norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(ts, grads)))
        return [r * t * t * g / (norm + EPS) for t, g in zip(ts, grads)]
    fs = [1 + eta_f * g ** 2 for g in grads]
    norm = torch.sqrt(sum((g ** 2 / f).sum() for f, g in zip(fs, grads)))
    return [r * (g / f) / (norm + EPS) for f, g in zip(fs, grads)]


def _groups(method, world, micro):
    """The sets of rows that share one perturbation e. Rank r holds rows [r*B/world, (r+1)*B/world),
    cut into `micro` micro-batches; mode "micro" gives each micro-batch (of all ranks) its own e,
    scope "rank" each rank its own, both together each (rank, micro-batch)."""
    per_rank = GLOBAL_BATCH // world
    mb = per_rank // micro

    def rows(r, i):
        return list(range(r * per_rank + i * mb, r * per_rank + (i + 1) * mb))

    by_micro, by_rank = method.get("mode") == "micro", method.get("scope") == "rank"
    if by_micro and by_rank:
        return [rows(r, i) for i in range(micro) for r in range(world)]
    if by_micro:
        return [sum((rows(r, i) for r in range(world)), []) for i in range(micro)]
    if by_rank:
        return [sum((rows(r, i) for i in range(micro)), []) for r in range(world)]
    return [list(range(GLOBAL_BATCH))]


def _clip(params, clip):
    """Clip the descent gradient g' to a global norm of at most `clip` (no-op for clip 0)."""
    if clip > 0:
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
        factor = min(1.0, clip / (norm.item() + 1e-6))
        for p in params:
            p.grad.mul_(factor)


def reference_run(method: dict, steps: int, world: int = 2, micro: int = 1, optim: str = "adamw",
                  bf16_init: bool = False, clip: float = 0.0, init_dtype=None):
    """Train `steps` TRAM steps on the full batch. Returns (state_dict, per-step metrics).

    bf16_init (or init_dtype) starts from weights rounded to that dtype, as DeepSpeed's fp32 masters
    do under bf16 or fp16."""
    geometry = method.get("geometry", "asam")
    target = method.get("target", "noised_input")
    rho = method.get("rho")
    eta, eta_f = method.get("eta", 0.0), method.get("eta_f", 0.1)
    scale, rho_max = method.get("scale", 1.0), method.get("rho_max")
    # scale "auto": the baseline radius (rho, else the paper's for the geometry) while the mean KL of
    # the first auto_steps measured steps is recorded, then scale = baseline / their median.
    auto, auto_kls, auto_scale = scale == "auto", [], None
    baseline = rho if rho is not None else {"sam": 0.05, "asam": 0.5, "fisher": 0.1}[geometry]
    scale = 1.0 if auto else scale
    sigma, direction = method.get("sigma", 0.1), method.get("divergence", "forward")
    decay, seed = method.get("ema_decay", 0.99), method.get("seed", 0)
    model = make_model(0)
    init_dtype = torch.bfloat16 if bf16_init else init_dtype
    if init_dtype is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(init_dtype).float())
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=LR) if optim == "adamw" else torch.optim.SGD(params, lr=SGD_LR)
    gens = [torch.Generator().manual_seed(seed + r) for r in range(world)]
    snapshot = [p.detach().clone() for p in params] if target in ("initial", "ema") else None
    noised_pass = method.get("noised_pass", False)  # TRAM-Fisher
    lagged_kl = None
    metrics = []
    n = GLOBAL_BATCH // world // micro

    def draw_noise():
        return torch.cat([torch.randn((n, SEQ, HIDDEN), generator=gens[rk]) * sigma
                          for rk in range(world) for _ in range(micro)])

    interval = method.get("interval", 1)
    for index, batch in enumerate(make_batches(steps)):
        ids, labels = batch["input_ids"], batch["labels"]
        if index % interval != 0:  # a plain step: one pass, the (clipped) update, snapshot first
            F.cross_entropy(_logits(model, ids), labels).backward()
            with torch.no_grad():
                thetas = [p.detach().clone() for p in params]
                if target == "previous":
                    snapshot = thetas
                elif target == "ema":
                    snapshot = [decay * s + (1 - decay) * th for s, th in zip(snapshot, thetas)]
                _clip(params, clip)
            opt.step()
            opt.zero_grad()
            metrics.append({})
            continue
        z = draw_noise() if target == "noised_input" else None
        acc = [torch.zeros_like(p) for p in params]
        radii, losses, grad_norms = [], [], []
        thetas = [p.detach().clone() for p in params]
        for group in _groups(method, world, micro):
            idx = torch.tensor(group)
            clean = _logits(model, ids[idx], z[idx] if noised_pass else None)  # TRAM-Fisher: noised pass 1
            loss = F.cross_entropy(clean, labels[idx])
            loss.backward()
            grads = [p.grad.detach().clone() for p in params]
            opt.zero_grad()
            with torch.no_grad():
                if target is None:
                    r = rho
                elif noised_pass:  # the KL measured after the previous step's pass 2
                    r = method.get("radius_at_start", 0.0) if lagged_kl is None else scale * lagged_kl
                elif target == "noised_input":
                    r = scale * kl_per_prediction(clean.detach(), _logits(model, ids[idx], z[idx]), direction).mean().item()
                elif snapshot is None:  # "previous" at step 0: no history yet
                    r = method.get("radius_at_start", 0.0)
                else:
                    for p, s_ in zip(params, snapshot):
                        p.copy_(s_)
                    tgt = _logits(model, ids[idx])
                    for p, th in zip(params, thetas):
                        p.copy_(th)
                    r = scale * kl_per_prediction(clean.detach(), tgt, direction).mean().item()
                measured = target is not None and not (noised_pass and lagged_kl is None) and not (
                    target in ("previous",) and snapshot is None)
                if auto and measured and auto_scale is None:
                    auto_kls.append(r)  # the mean KL (scale is 1 under "auto")
                    r = baseline
                    if len(auto_kls) == method.get("auto_steps", 32):
                        auto_scale = baseline / statistics.median(auto_kls)
                elif auto and measured:
                    r = auto_scale * r
                if target is not None and rho_max is not None:
                    r = min(r, rho_max)
                for p, th, e in zip(params, thetas, _e(geometry, thetas, grads, r, eta, eta_f)):
                    p.copy_(th + e)
            perturbed_logits = _logits(model, ids[idx])
            loss_perturbed = F.cross_entropy(perturbed_logits, labels[idx])
            (loss_perturbed / len(_groups(method, world, micro))).backward()
            if noised_pass:  # KL(p(x+z; theta) || p(x; theta+e)), used at the next step
                lagged_kl = kl_per_prediction(perturbed_logits.detach(), clean.detach(), direction).mean().item()
            with torch.no_grad():
                for p, a_, th in zip(params, acc, thetas):
                    a_.add_(p.grad)
                    p.copy_(th)
            opt.zero_grad()
            radii.append(r)
            losses.append(loss.item())
            grad_norms.append(torch.sqrt(sum((g ** 2).sum() for g in grads)).item())
        with torch.no_grad():
            for p, a_ in zip(params, acc):
                p.grad = a_
            if target == "previous":
                snapshot = [th.clone() for th in thetas]
            elif target == "ema":
                snapshot = [decay * s_ + (1 - decay) * th for s_, th in zip(snapshot, thetas)]
            _clip(params, clip)
        r, loss = sum(radii) / len(radii), sum(losses) / len(losses)
        opt.step()
        opt.zero_grad()
        metrics.append({"d": r, "loss": loss, "grad_norm": grad_norms[0],
                        "kl_scale": (auto_scale if auto else scale) if target is not None else None})
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics
