"""The EFD1 delta test vector (docs/protocol.md §8.1): a seeded base, a target made from it, and a patch that uses
every operation (COPY, LIT, ADD byte-wise, ADD and XOR byte-grouped over 4-byte elements, ZLIT). An independent
implementation applies ``patch`` over ``base`` and must produce ``target`` (size and SHA-256). Regenerate with
``scripts/gen_test_vectors.py`` only when the format changes on purpose."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import numpy as np

from agent.protocol import delta as fmt


def build() -> dict[str, Any]:
    rng = np.random.default_rng(20261206)
    base = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes() + b"graph:node:" * 200
    floats = rng.standard_normal(256).astype(np.float32)
    base += floats.tobytes()
    new_floats = (floats * np.float32(1.01)).astype(np.float32).tobytes()
    int8 = bytes((b + 1) % 256 for b in base[1024:2048])
    text = b"graph:node:" * 120 + b"NEW-NODE" + b"graph:node:" * 79
    target = base[:1024] + int8 + b"literal bytes" + new_floats + new_floats + text
    f_off = 4096 + 2200
    ops = [
        fmt.Op(fmt.OP_COPY, 1024, 0),
        fmt.Op(fmt.OP_ADD, 1024, 1024, 1, fmt.diff_add(base[1024:2048], int8, 1)),
        fmt.Op(fmt.OP_LIT, 13, data=b"literal bytes"),
        fmt.Op(fmt.OP_XOR, 1024, f_off, 4 | fmt.GROUPED,
               fmt.group_bytes(fmt.diff_xor(base[f_off : f_off + 1024], new_floats, 4), 4)),
        fmt.Op(fmt.OP_ADD, 1024, f_off, 4 | fmt.GROUPED,
               fmt.group_bytes(fmt.diff_add(base[f_off : f_off + 1024], new_floats, 4), 4)),
        fmt.zlit(base, 4096, 2200, text),
    ]  # fmt: skip
    patch = fmt.build_patch(fmt.DeltaHeader(len(target), len(base)), ops)
    return {
        "base_b64": base64.b64encode(base).decode(),
        "base_sha256": hashlib.sha256(base).hexdigest(),
        "target_size": len(target),
        "target_sha256": hashlib.sha256(target).hexdigest(),
        "patch_b64": base64.b64encode(patch).decode(),
        "operations": ["COPY", "ADD w1", "LIT", "XOR w4 grouped", "ADD w4 grouped", "ZLIT"],
    }
