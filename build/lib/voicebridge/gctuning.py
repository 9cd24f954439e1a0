"""Garbage-collector settings for a process that carries live audio.

CPython's cyclic collector stops the whole process while it runs. Measured in the
bridge under ``voicebridge loadtest`` (60 calls on one core, docs/performance.md):
with the default thresholds a full (generation 2) collection walked every object of
the process — the ~65,000 objects imported at start-up (twilio, quart, hypercorn …)
plus the live calls' — and stopped every call for 65–72 ms, five times in 15 s; and
700-object generation-0 collections ran ~60 times a second. Every frame that arrived
during a pause waited it out: that alone put the p99 added latency near 75 ms.

``tune_gc_for_latency`` therefore (1) freezes what exists once the server is built
(``gc.freeze``: start-up objects live for the life of the process anyway; they are no
longer walked by any collection), and (2) raises the generation-0 threshold, so that
young-object collections are rare and full ones rarer still. Garbage without cycles
is still freed at once by reference counting; cyclic garbage (exceptions with their
tracebacks, cancelled tasks) is collected a little later. ``voicebridge loadtest``
reports RSS per call, which shows whether memory stays flat.
"""

from __future__ import annotations

import gc
from typing import Final

#: Net allocations between generation-0 collections (CPython's default is 700).
#: A call allocates a few objects per frame that die at once; what survives a frame
#: is small, so collections stay short however rare they are.
GEN0_THRESHOLD: Final = 10_000
#: Generation-0 collections per generation-1 one, and generation-1 per full collection.
GEN1_THRESHOLD: Final = 10
GEN2_THRESHOLD: Final = 10


def tune_gc_for_latency() -> None:
    """Freeze the objects that exist now and raise the collection thresholds.

    Call it once the process has imported and built what it serves with, before it
    takes calls. Calling it again freezes whatever was created in between.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
