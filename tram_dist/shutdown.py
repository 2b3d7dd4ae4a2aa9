"""End a distributed run so that a gloo (CPU) job does not abort in interpreter teardown.

What happens without it (torch 2.13 CPU, DeepSpeed 0.19.8, gdb backtrace of the aborting rank):
a gloo worker thread ("pt_gloo_runloop") still holds DeepSpeed's last finished all-gather when the
interpreter finalises. Freeing that work releases a tensor whose Python object needs the GIL; a
finalising interpreter ends any thread that asks for the GIL, and that unwind through a C++
destructor calls std::terminate ("terminate called without an active exception", SIGABRT). The
run's work is done by then, but the rank exits -6 and a launcher reports the job failed (1 run in 6
of examples/deepspeed_zero3.py on 2 CPU cores). dist.destroy_process_group() does not prevent it:
DeepSpeed's engine still holds the group, so its threads outlive the call.

Over NCCL none of this applies and the group is destroyed as usual.
"""
from __future__ import annotations

import os
import sys
from typing import NoReturn

import torch.distributed as dist


def exit_run(code: int = 0) -> NoReturn:
    """Leave the process once every rank has arrived here.

    Over gloo the process leaves with os._exit after flushing stdout and stderr: no interpreter
    teardown, no atexit handlers, so call it only once everything the run writes is written and
    closed. Otherwise the process group is destroyed and the process exits with `code`.
    """
    if dist.is_available() and dist.is_initialized():
        gloo = dist.get_backend() == "gloo"
        dist.barrier()
        if gloo:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        dist.destroy_process_group()
    sys.exit(code)
