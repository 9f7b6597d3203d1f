"""Keep the cyclic garbage collector's full passes short: the long-lived heap is frozen out of them.

A full (generation 2) collection walks every tracked object; the agent's heap after startup (ONNX Runtime,
NumPy, cryptography, paho and the agent's own modules) made one take ~31 ms here, holding the GIL: a chunk
stream, the HTTP threads' inferences and paho's network thread all stopped for it. Allocation-heavy work
(a 512-chunk transfer) triggered one every few transfers (docs/benchmarks.md, "Artifact transfer").
``gc.freeze()`` moves every object alive now into a permanent generation that collections skip; what was
collected just before is freed, so nothing reachable-only-by-a-cycle is pinned. Each call first returns the
frozen objects to the collector (``gc.unfreeze()``): a model version frozen alive at one commit and released
at a later one (its session, its standby) may be garbage in a cycle by then, and stays frozen otherwise, one
leak per swap. Called once the agent has started and after each commit (a first model load imports its
runtime's modules), off the chunk path: that one full collection is the ~31 ms the transfers no longer pay.
"""

from __future__ import annotations

import gc


def settle_heap() -> None:
    """Collect everything now (what an earlier call froze included), then leave every survivor out of later
    collections."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
