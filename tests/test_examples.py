"""Run every examples/ script for real and check what it prints; keep the docs and examples in step.

The per-stack snippets live in the Usage section of docs/stacks-and-precision.md (USAGE_DOC).

local.py runs as one process; every other script runs on 2 gloo ranks under torchrun. Only rank 0
prints, one line per step: "step S d=... grad_norm=... e_norm=... loss=...".
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from launcher import WORLD, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SCRIPTS = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py"))
USAGE_DOC = os.path.join(ROOT, "docs", "stacks-and-precision.md")
SINGLE_PROCESS = {"local.py"}
STEPS = 3
TIMEOUT = 240
NUM = r"([-+0-9.eE]+|nan|inf|-inf)"
LINE = re.compile(rf"step (\d+) d={NUM} grad_norm={NUM} e_norm={NUM} loss={NUM}")


def run_example(script: str) -> subprocess.CompletedProcess:
    path = os.path.join(EXAMPLES, script)
    if script in SINGLE_PROCESS:
        cmd = [sys.executable, path]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), path]
    env = dict(os.environ, OMP_NUM_THREADS="1", KINETO_LOG_LEVEL="5")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{script} ran past {TIMEOUT}s\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def test_examples_found():
    assert "local.py" in SCRIPTS and len(SCRIPTS) >= 5, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script):
    out = run_example(script).stdout
    rows = {int(m.group(1)): [float(x) for x in m.groups()[1:]] for m in LINE.finditer(out)}
    assert sorted(rows) == list(range(STEPS)), f"{script}: expected steps 0..{STEPS - 1} in\n{out}"
    for step, (d, grad_norm, e_norm, loss) in rows.items():
        assert all(math.isfinite(v) for v in (d, grad_norm, e_norm, loss)), (script, step, rows[step])
        assert d > 0 and e_norm > 0 and grad_norm > 0, f"{script} step {step}: no perturbation {rows[step]}"


def _usage_section() -> str:
    with open(USAGE_DOC) as f:
        text = f.read()
    m = re.search(r"^## Usage\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert m, "docs/stacks-and-precision.md has no '## Usage' section followed by another section"
    return m.group(1)


def test_usage_doc_references_every_example():
    usage = _usage_section()
    missing = [s for s in SCRIPTS if f"examples/{s}" not in usage]
    assert not missing, f"the Usage section of docs/stacks-and-precision.md does not mention {missing}"
    stale = sorted(set(re.findall(r"examples/(\w+\.py)", usage)) - set(SCRIPTS))
    assert not stale, f"the Usage section of docs/stacks-and-precision.md names examples that do not exist: {stale}"


def test_usage_snippets_are_excerpts_of_the_examples_that_run():
    """Every code line of a Usage snippet (docs/stacks-and-precision.md) stands verbatim in the
    example script its heading links to, so the snippets are code that test_example_runs executes."""
    usage = _usage_section()
    # A heading links its script from docs/: "### DDP: [examples/ddp.py](../examples/ddp.py)".
    sections = re.findall(r"^### .*?\((?:\.\./)?examples/(\w+\.py)\)\n(.*?)(?=^### |\Z)", usage, flags=re.S | re.M)
    assert len(sections) == len(SCRIPTS), [s for s, _ in sections]
    for script, body in sections:
        with open(os.path.join(EXAMPLES, script)) as f:
            source = {_code(line) for line in f}
        for block in re.findall(r"```python\n(.*?)```", body, flags=re.S):
            missing = [_code(ln) for ln in block.splitlines() if _code(ln) and _code(ln) not in source]
            assert not missing, f"the Usage snippet for {script} has lines not in the script: {missing}"


def _code(line: str) -> str:
    """A line without its trailing comment and surrounding white space."""
    return re.sub(r"(^|\s+)#.*$", "", line).strip()
