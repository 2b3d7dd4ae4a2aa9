"""Run tests/dist_worker.py on 2 gloo ranks under torchrun and collect each rank's result file."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, *worker_args: str, timeout: int = 240, max_restarts: int = 0,
             script: str = "dist_worker.py") -> list[dict]:
    """Launch 2 ranks of tests/<script>; fail with their output on a non-zero exit or a hang;
    return rank results (each rank's rank{r}.pt in tmp_path)."""
    os.makedirs(tmp_path, exist_ok=True)
    # A run that may restart needs the c10d rendezvous: its store is fresh for every round, while
    # the static one keeps the dead attempt's addresses and the new gloo mesh cannot connect.
    rendezvous = (["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}"] if max_restarts
                  else ["--master_addr", "127.0.0.1", "--master_port", str(free_port())])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--max-restarts", str(max_restarts), *rendezvous,
           os.path.join(HERE, script), "--out", str(tmp_path), *worker_args]
    env = dict(os.environ, OMP_NUM_THREADS="1", KINETO_LOG_LEVEL="5", PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"distributed run hung past {timeout}s: {' '.join(cmd)}\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(WORLD)]


_groups: dict = {}


def torchrun_group(tmp_path_factory, name: str, cases, *worker_args: str, timeout: int = 600) -> dict:
    """Several (stack, variant) cases of tests/dist_worker.py with the same worker arguments, in one
    2-rank launch (a launch costs 6-9 s of imports and set-up here, more than a case of the tiny
    model), made by the first test that asks for group ``name`` and kept for the others; returns
    {(stack, variant): [rank results]}."""
    if name not in _groups:
        results = torchrun(tmp_path_factory.mktemp(name), "--cases", ";".join(f"{s}:{v}" for s, v in cases),
                           *worker_args, timeout=timeout)
        _groups[name] = {(s, v): [r[f"{s}:{v}"] for r in results] for s, v in cases}
    return _groups[name]
