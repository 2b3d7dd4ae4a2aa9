"""What this machine can run: tests that need a capability it lacks skip, and say why."""
from __future__ import annotations

import pytest
import torch

# DeepSpeed's CPU accelerator takes fp16 only where oneDNN has fp16 kernels (AMD EPYC, for one,
# has none): there it refuses fp16 with "Type fp16 is not supported on your device".
CPU_FP16 = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
needs_deepspeed_fp16 = pytest.mark.skipif(
    not CPU_FP16, reason="DeepSpeed refuses fp16 on this CPU: no oneDNN fp16 "
                         "(torch.ops.mkldnn._is_mkldnn_fp16_supported() is False)")
