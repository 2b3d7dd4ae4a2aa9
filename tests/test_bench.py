"""bench/: the counted parts of `make bench` on DDP (2 ranks), bench/gpu_check.sh's shape, bench/llm.py's
two malloc modes and its pooled rounds, and the experiments' paired differences.

Step-time ratios are measured by `make bench` and quoted in docs/results.md; no test asserts a time. What
is asserted here is counted: TRAM adds exactly one all-reduce (56 bytes) to two plain passes,
holds exactly one copy of the local pieces while theta + e is loaded, and a snapshot target holds
one more; the plain-loop SAM peer holds a full weight copy.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"backend", "method", "step_time_ratio", "ratio_range", "collectives_per_step", "bytes_per_step", "extra_bytes_per_rank"}


def test_bench_counts_on_ddp(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench.py"), "--backends", "ddp",
                           "--rounds", "1", "--batch", "2", "--out", str(out), "--tmp", str(tmp_path / "ranks")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["records"]}
    assert set(rows) == {"base", "sam", "tram_noised_input", "tram_previous", "tram_initial", "tram_ema",
                         "tram_fisher", "plain_sam"}
    assert all(FIELDS <= set(r) for r in rows.values())
    base, shard = rows["base"], rows["base"]["local_shard_bytes"]
    assert base["ratio_range"] == [1.0, 1.0]  # each round's base step over itself: the rounds are paired
    assert shard == 4 * base["params"]  # DDP: every rank's local pieces are the whole fp32 model
    for name in ("sam", "tram_noised_input", "tram_previous", "tram_initial", "tram_ema", "tram_fisher"):
        r = rows[name]
        # two passes of DDP's own collectives plus TRAM's one packed all-reduce of 7 float64s
        assert r["collectives_per_step"] == 2 * base["collectives_per_step"] + 1, r["collectives_by_op"]
        assert r["bytes_per_step"] == 2 * base["bytes_per_step"] + 56, r["bytes_by_call"]
        assert r["extra_bytes_per_rank"] == shard  # one copy of the local pieces, for the restore
        snapshot = name in ("tram_previous", "tram_initial", "tram_ema")
        assert r["target_bytes_per_rank"] == (shard if snapshot else 0)
    assert rows["plain_sam"]["extra_bytes_per_rank"] == shard
    assert rows["plain_sam"]["collectives_per_step"] == 2 * base["collectives_per_step"]
    assert "| ddp | tram_noised_input |" in proc.stdout


def test_gpu_check_script():
    bash = shutil.which("bash")
    assert subprocess.run([bash, "-n", os.path.join(ROOT, "bench", "gpu_check.sh")]).returncode == 0
    proc = subprocess.run([bash, os.path.join(ROOT, "bench", "gpu_check.sh")], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr  # this machine has none: a clear refusal


def test_gpu_check_runs_its_code_on_the_cpu_at_a_toy_size():
    """The GPU check's own code end to end (DEVICE=cpu: fp32, Qwen2.5-0.5B's width at one layer and a
    512-entry vocabulary): every method stepped side by side with AdamW in each round, a row each."""
    env = dict(os.environ, PYTHON=sys.executable, DEVICE="cpu", MODELS="qwen0.5b", VOCAB="512", LAYERS="1",
               BATCH="1", SEQ="32", ROUNDS="1", WARMUP="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([shutil.which("bash"), os.path.join(ROOT, "bench", "gpu_check.sh")], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["method"] for r in rows] == ["adamw", "sam", "tram_x", "tram_previous", "tram_fisher"]
    assert rows[0]["ratio"] == 1.0 and rows[0]["ratio_range"] == [1.0, 1.0]
    for r in rows:
        assert r["model"] == "qwen0.5b" and r["L_bytes"] == 1 * 32 * 512 * 4 and r["rounds"] == 1
        assert math.isfinite(r["ratio"]) and 0 < r["ratio_range"][0] <= r["ratio"] <= r["ratio_range"][1]
    assert "| qwen0.5b | " in proc.stdout and "| tram_fisher |" in proc.stdout


def test_bench_llm_malloc_keeps_or_returns_freed_memory():
    """bench/llm.py times its steps with glibc's malloc keeping what they free (as a GPU's caching
    allocator) and measures memory with it giving everything back: a freed 256 MB tensor stays
    resident in the first mode and leaves in the second. In a process of its own: malloc's settings
    are the process's."""
    code = """
import sys, torch
sys.path.insert(0, "bench")
import llm
rss = lambda: llm.status_bytes("VmRSS:")
llm.keep_freed_memory(True)
start = rss()
t = torch.ones(64 << 20)
del t
kept = rss() - start
llm.keep_freed_memory(False)
print(kept, rss() - start)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept, after = map(int, proc.stdout.split())
    assert kept > 200 << 20 and after < 50 << 20, (kept, after)


def test_bench_llm_pools_the_rounds_of_its_runs(tmp_path):
    """`bench/llm.py --pool`: every timed round of the runs' entries, rank 0's, one median and range per
    (stack, method) and the fastest step over the fastest AdamW step (of other rounds here); another
    protocol's entry (--fresh-malloc) is not mixed in."""
    def run(rounds_s, fresh=None):
        row = dict(stack="fsdp2", method="sam", rank=0, rounds_s=rounds_s)
        entry = {"layers2": {"rows": [row, dict(row, rank=1, rounds_s=[[99.0, 1.0]])]}}
        if fresh is not None:
            entry["layers2_fresh_malloc"] = {"rows": [dict(row, rounds_s=fresh)]}
        return entry

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(run([[2.0, 1.0], [9.0, 3.0]], fresh=[[5.0, 1.0]])))
    b.write_text(json.dumps(run([[4.4, 0.8]])))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "llm.py"), "--pool", str(a), str(b)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| fsdp2 | sam | 3 | 3.00 (2.00-5.50) | 2.50 |" in proc.stdout, proc.stdout
    c = tmp_path / "c.json"  # timed with malloc giving memory back: not pooled with the kept runs
    c.write_text(json.dumps({"layers2": dict(run([[2.0, 1.0]])["layers2"], timed_malloc="fresh")}))
    a.write_text(json.dumps({"layers2": dict(run([[2.0, 1.0]])["layers2"], timed_malloc="kept")}))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "llm.py"), "--pool", str(a), str(c)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "different malloc protocols" in proc.stderr, proc.stdout + proc.stderr


def test_experiment_table_pairs_by_seed():
    """The experiments' table: each method's OOD mean minus AdamW's and SAM's of the same seed, with
    the seeds above; AdamW and SAM from the hand-set sweep where the records have none."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from experiments import summarize

    def record(method, seed, ood):
        return {"method": method, "seed": seed, "ood_mean": ood, "eps_sharpness": 1.0, "train_seconds": 1.0,
                "balanced_accuracy": dict.fromkeys(("movie", "amazon", "nyt", "tweets"), ood),
                "median_radius": None, "kl_scale": None}

    baselines = [record("adamw", 0, 0.60), record("adamw", 1, 0.70), record("sam", 0, 0.50), record("sam", 1, 0.80)]
    rows = summarize([record("tram_x", 0, 0.65), record("tram_x", 1, 0.66)], baselines).splitlines()
    cells = [c.strip() for c in rows[-1].split("|")]
    assert cells[1] == "tram_x"
    assert cells[8:10] == ["+0.005 (1/2)", "+0.005 (1/2)"]  # (0.05 - 0.04) / 2 and (0.15 - 0.14) / 2
    own = summarize([record("adamw", 0, 0.55), record("tram_x", 0, 0.65)], baselines).splitlines()
    assert [c.strip() for c in own[-1].split("|")][8] == "+0.100 (1/1)"  # the records' own AdamW first
