"""Keep the cyclic garbage collector's full passes short: the long-lived heap is frozen out of them.

A full (generation 2) collection walks every tracked object; the agent's heap after startup (ONNX Runtime,
NumPy, cryptography, paho and the agent's own modules) made one take ~31 ms here, holding the GIL: a chunk
stream, the HTTP threads' inferences and paho's network thread all stopped for it. Allocation-heavy work
(a 512-chunk transfer) triggered one every few transfers (docs/benchmarks.md, "Artifact transfer").
``gc.freeze()`` moves every object alive now into a permanent generation that collections skip; what was
collected just before is freed, so nothing reachable-only-by-a-cycle is pinned. Called once the agent has
started and after each commit (a first model load imports its runtime's modules), off the chunk path.
"""

from __future__ import annotations

import gc


def settle_heap() -> None:
    """Collect now, then leave every surviving object out of later collections."""
    gc.collect()
    gc.freeze()
