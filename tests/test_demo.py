"""`make demo`'s job runs end to end on 2 ranks under ZeRO-3 and prints finite per-step metrics."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

ROW = re.compile(r"^\s*(\d+)\s+([-\d.e+]+)\s+([-\d.e+]+)\s+([-\d.e+]+)\s+([-\d.e+]+)\s+([-\d.e+]+)\s*$")


def test_demo_runs_and_prints_metrics():
    env = dict(os.environ, KINETO_LOG_LEVEL="5")
    proc = subprocess.run([sys.executable, "-m", "tram_dist.demo", "--steps", "4"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [ROW.match(line) for line in proc.stdout.splitlines()]
    rows = [r for r in rows if r]
    assert [int(r.group(1)) for r in rows] == [0, 1, 2, 3], proc.stdout
    for r in rows:
        values = [float(r.group(i)) for i in range(2, 7)]
        assert all(math.isfinite(v) for v in values), r.group(0)
    assert any(float(r.group(4)) > 0 for r in rows), "the divergence radius never moved off 0"
    assert re.search(r"held-out accuracy after 4 steps: [01]\.\d{3}", proc.stdout), proc.stdout
