"""exit_run: every rank leaves with the given code and its buffered output written."""
import subprocess
import sys

import pytest

SCRIPT = """
import sys, torch.distributed as dist
from tram_dist.shutdown import exit_run
if sys.argv[1] == "gloo":
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
print("written before exit", end="")  # no newline: still in stdout's buffer when exit_run runs
print("err too", file=sys.stderr, end="")
exit_run(int(sys.argv[2]))
print("never")
"""


@pytest.mark.parametrize("group", ["gloo", "none"])
@pytest.mark.parametrize("code", [0, 3])
def test_exit_run_keeps_code_and_output(group, code):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, group, str(code)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "written before exit"
    assert proc.stderr.endswith("err too")
