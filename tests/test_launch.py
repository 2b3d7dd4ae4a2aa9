"""Run every launch/ script for real on this machine and check what rank 0 prints.

torchrun on one node (2 processes) and as 2 nodes x 1 process joined by a c10d rendezvous; the
deepspeed launcher with launch/hostfile.example and with no hostfile; accelerate launch with
launch/accelerate_config.yaml; the SLURM batch script checked for syntax, printed by a dry run,
and run under a stand-in srun that starts its 2 node tasks here. Every run trains 2 ranks for 3
steps, and rank 0 prints "step S d=... grad_norm=... e_norm=... loss=..." once per step.
"""
from __future__ import annotations

import math
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from launcher import WORLD, free_port
from test_examples import LINE, STEPS, TIMEOUT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
BASH = shutil.which("bash")
KNOBS = ("NPROC_PER_NODE", "SCRIPT", "NNODES", "NODE_RANK", "RDZV_ENDPOINT", "RDZV_ID", "HOSTFILE", "NUM_GPUS",
         "MASTER_ADDR", "MASTER_PORT", "SSH_CHECK", "CONFIG", "NUM_PROCESSES", "NUM_MACHINES", "MACHINE_RANK",
         "MAIN_PROCESS_IP", "MAIN_PROCESS_PORT", "RDZV_PORT", "DRY_RUN")


def launch_env(**knobs: str) -> dict:
    """This interpreter, its deepspeed and accelerate commands first on PATH, and the knobs."""
    env = dict(os.environ, OMP_NUM_THREADS="1", KINETO_LOG_LEVEL="5", PYTHON=sys.executable,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for name in KNOBS:
        env.pop(name, None)  # a knob exported in the caller's shell must not change what runs
    env.update(knobs)
    return env


def start(args: list[str], env: dict) -> subprocess.Popen:
    # A session of its own, so a hang can be ended with every rank the launcher started.
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(procs: list[subprocess.Popen], what: str) -> str:
    """Wait for every launcher, fail with its output unless all exit 0; return stdout + stderr."""
    outs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"{what} ran past {TIMEOUT}s\n{out[-4000:]}\n{err[-8000:]}")
        outs.append((proc, out, err))
    for proc, out, err in outs:
        assert proc.returncode == 0, f"{what}: {proc.args} exited {proc.returncode}\n{out[-4000:]}\n{err[-8000:]}"
    return "\n".join(out + "\n" + err for _, out, err in outs)


def run(script: str, *args: str, **knobs: str) -> str:
    return finish([start([BASH, os.path.join(LAUNCH, script), *args], launch_env(**knobs))], script)


def assert_three_steps(out: str, what: str) -> None:
    """Rank 0 alone prints: steps 0..STEPS-1, each exactly once, with finite, non-zero metrics."""
    matches = list(LINE.finditer(out))
    steps = [int(m.group(1)) for m in matches]
    assert steps == list(range(STEPS)), f"{what}: expected steps 0..{STEPS - 1} once each, got {steps} in\n{out[-6000:]}"
    for m in matches:
        d, grad_norm, e_norm, loss = (float(x) for x in m.groups()[1:])
        assert all(math.isfinite(v) for v in (d, grad_norm, e_norm, loss)), (what, m.group(0))
        assert d > 0 and grad_norm > 0 and e_norm > 0, f"{what}: no perturbation in {m.group(0)}"


def test_torchrun_single_node():
    out = run("torchrun_single_node.sh", NPROC_PER_NODE=str(WORLD))
    assert_three_steps(out, "torchrun_single_node.sh")


def test_torchrun_multi_node_rendezvous():
    """Two agents on this machine play two nodes of one process each."""
    port = free_port()
    knobs = dict(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID=f"test{port}")
    script = os.path.join(LAUNCH, "torchrun_multi_node.sh")
    procs = [start([BASH, script], launch_env(NODE_RANK=str(r), **knobs)) for r in range(2)]
    # The rendezvous, not NODE_RANK, decides which node holds global rank 0: read both outputs.
    assert_three_steps(finish(procs, "torchrun_multi_node.sh"), "torchrun_multi_node.sh")


@pytest.mark.parametrize("mode", ["hostfile", "no_hostfile"])
def test_deepspeed_launcher(mode):
    if mode == "hostfile":
        # launch/hostfile.example ("localhost slots=2") starts 2 ranks. A hostfile makes the
        # launcher check ssh to its first host and, without MASTER_ADDR, ask that host for its
        # address over ssh; this machine runs no ssh server, so the test skips both. One host
        # takes the launcher's local path (no pdsh), as on the first node of a real cluster.
        knobs = dict(MASTER_ADDR="127.0.0.1", SSH_CHECK="0")
    else:
        # No hostfile: this node only. The CPU accelerator counts 1 device, so NUM_GPUS=2.
        knobs = dict(HOSTFILE="", NUM_GPUS=str(WORLD))
    out = run("deepspeed.sh", MASTER_PORT=str(free_port()), **knobs)
    assert f"dist_world_size={WORLD}" in out, out[-6000:]
    assert f"--local_rank={WORLD - 1}" in out, "the launcher passed no --local_rank to the last rank"
    assert_three_steps(out, f"deepspeed.sh ({mode})")


def test_accelerate_launch():
    out = run("accelerate.sh", MAIN_PROCESS_PORT=str(free_port()))
    # accelerate_train.py also raises if accelerate sees fewer processes than were launched.
    assert f"accelerate: {WORLD} processes" in out, out[-6000:]
    assert_three_steps(out, "accelerate.sh")


def test_accelerate_launch_under_deepspeed():
    """The same launcher with launch/accelerate_deepspeed_train.py: accelerate's DeepSpeed plugin
    (ZeRO-3), TRAM driving the engine that accelerator.prepare returns."""
    out = run("accelerate.sh", MAIN_PROCESS_PORT=str(free_port()), SCRIPT=os.path.join(LAUNCH, "accelerate_deepspeed_train.py"))
    assert f"accelerate: {WORLD} processes, DEEPSPEED, DeepSpeedEngine ZeRO-3" in out, out[-6000:]
    assert_three_steps(out, "accelerate.sh (DeepSpeed)")


def test_slurm_syntax():
    proc = subprocess.run([BASH, "-n", os.path.join(LAUNCH, "slurm.sbatch")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def slurm_env(tmp_path, nodelist: str, **knobs: str) -> dict:
    """Fake SLURM variables; PATH without a real scontrol or srun, tmp_path/bin first."""
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if not any(os.path.exists(os.path.join(d, c)) for c in ("scontrol", "srun"))]
    env = launch_env(SLURM_JOB_NODELIST=nodelist, SLURM_NNODES="2", SLURM_NODEID="1", SLURM_JOB_ID="4242",
                     SLURM_SUBMIT_DIR=ROOT, **knobs)
    env["PATH"] = os.pathsep.join([str(tmp_path / "bin"), os.path.dirname(sys.executable), *path])
    return env


def fake_command(tmp_path, name: str, body: str) -> None:
    (tmp_path / "bin").mkdir(exist_ok=True)
    path = tmp_path / "bin" / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def dry_run(env: dict) -> list[str]:
    proc = subprocess.run([BASH, os.path.join(LAUNCH, "slurm.sbatch"), "--lr", "a b"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return shlex.split(lines[0])


def flag(cmd: list[str], name: str) -> str:
    assert name in cmd, f"{name} missing from {cmd}"
    return cmd[cmd.index(name) + 1]


def test_slurm_dry_run_without_scontrol(tmp_path):
    cmd = dry_run(slurm_env(tmp_path, "nodeA,nodeB", DRY_RUN="1", RDZV_PORT="29555"))
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"], cmd
    assert flag(cmd, "--nnodes") == "2" and flag(cmd, "--node_rank") == "1", cmd
    assert flag(cmd, "--rdzv_backend") == "c10d" and flag(cmd, "--rdzv_id") == "4242", cmd
    assert flag(cmd, "--rdzv_endpoint") == "nodeA:29555", cmd
    assert cmd[-3:] == ["examples/ddp.py", "--lr", "a b"], "script and its arguments, quoting kept"


def test_slurm_dry_run_expands_nodelist_with_scontrol(tmp_path):
    env = slurm_env(tmp_path, "gpu[07-08]", DRY_RUN="1", RDZV_PORT="29555")
    fake_command(tmp_path, "scontrol", '[ "$*" = "show hostnames gpu[07-08]" ] || exit 2\nprintf "gpu07\\ngpu08\\n"\n')
    assert flag(dry_run(env), "--rdzv_endpoint") == "gpu07:29555"


def test_slurm_runs_under_stand_in_srun(tmp_path):
    """A stand-in srun starts the batch script's task once per node here, each with its own
    SLURM_NODEID, so the per-node --node_rank expansion and the rendezvous run for real."""
    fake_command(tmp_path, "srun", (
        'while [[ "$1" == -* ]]; do shift; done  # srun options\n'
        'pids=()\n'
        'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done\n'
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc\n'))
    # PYTHON logs each node's torchrun command line, one line per node, then runs it.
    fake_command(tmp_path, "python-logged", f'echo "$*" >> {shlex.quote(str(tmp_path / "commands"))}\n'
                                            f'exec {shlex.quote(sys.executable)} "$@"\n')
    env = slurm_env(tmp_path, "127.0.0.1,127.0.0.1", NPROC_PER_NODE="1", RDZV_PORT=str(free_port()),
                    PYTHON=str(tmp_path / "bin" / "python-logged"))
    proc = start([BASH, os.path.join(LAUNCH, "slurm.sbatch")], env)
    assert_three_steps(finish([proc], "slurm.sbatch"), "slurm.sbatch under a stand-in srun")
    # The launcher's own python is the same wrapper: keep the torchrun lines only.
    agents = [c.split() for c in (tmp_path / "commands").read_text().splitlines() if "torch.distributed.run" in c]
    assert sorted(flag(c, "--node_rank") for c in agents) == ["0", "1"], agents
