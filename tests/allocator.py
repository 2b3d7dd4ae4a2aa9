"""The CPU allocator's view of memory: bytes allocated minus bytes freed, in order, from
torch.profiler's memory events. Exact and repeatable where an RSS reading moves by a few
hundred MB from run to run (glibc keeps freed pages, other processes share the machine).

    with Allocations() as mem:
        mem.mark("adamw"); adamw_step()
        mem.mark("tram"); tram.step(batch)
    mem.peaks()  # {"adamw": bytes, "tram": bytes}

All segments share one origin (the live bytes when the block was entered), so their peaks compare
directly: what one segment leaves alive counts in the next one's peak. Used by
tests/test_llm_memory.py and bench/llm.py.
"""
from __future__ import annotations

import time

from torch.profiler import ProfilerActivity, profile


class Allocations:
    def __init__(self):
        self._marks: list[tuple[int, str]] = []
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self) -> "Allocations":
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)

    def mark(self, name: str) -> None:
        """From here to the next mark (or the block's end) is segment `name`."""
        self._marks.append((time.time_ns(), name))  # the profiler's events carry wall-clock times

    def peaks(self) -> dict[str, int]:
        """Each segment's peak of live bytes over the block's origin (a segment's first peak is
        never below where it started)."""
        events = sorted((e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        peaks, live, i = {}, 0, 0
        for k, (start, name) in enumerate(self._marks):
            end = self._marks[k + 1][0] if k + 1 < len(self._marks) else float("inf")
            while i < len(events) and events[i][0] < start:
                live += events[i][1]
                i += 1
            peak = live
            while i < len(events) and events[i][0] < end:
                live += events[i][1]
                peak = max(peak, live)
                i += 1
            peaks[name] = peak
        return peaks
