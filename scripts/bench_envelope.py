"""Envelope throughput: seal and open a 64 MB artifact in 64 KB chunks, beside raw AES-256-GCM.

    .venv/bin/python scripts/bench_envelope.py [--quick] [--json PATH] [--size-mb N] [--chunk-kb N]

Rows (best of N repetitions, MB/s of model bytes):
  raw_aesgcm_encrypt / raw_aesgcm_decrypt   AESGCM over the same chunks, nothing else (the baseline)
  seal                                      edgefleet chunk framing + AEAD with the header as AAD
  open                                      header parse + checks + AEAD verify/decrypt (ChunkOpener)
  open+reassemble                           open, then Reassembly.add into memory + final SHA-256
Target: open >= 0.7x raw decrypt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.core.reassembly import MemorySink, Reassembly
from agent.protocol import envelope
from agent.protocol.messages import ArtifactInfo


def best_of(reps: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (well under a minute)")
    parser.add_argument("--json", type=Path, help="write results as JSON to this path")
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--chunk-kb", type=int, default=64)
    args = parser.parse_args()
    reps = 3 if args.quick else 7

    size = args.size_mb * 1024 * 1024
    chunk = args.chunk_kb * 1024
    model = os.urandom(size)
    key = AESGCM.generate_key(bit_length=256)
    artifact_id = envelope.new_artifact_id()
    pieces = [model[i : i + chunk] for i in range(0, size, chunk)]
    count = len(pieces)

    aead = AESGCM(key)
    nonces = [envelope.chunk_nonce(i) for i in range(count)]
    raw_ct = [aead.encrypt(nonces[i], p, None) for i, p in enumerate(pieces)]

    raw_out: list[bytes] = []

    def raw_encrypt() -> None:
        # keeps its output like seal() does: a sealer must hold the ciphertext it produced
        a = AESGCM(key)
        raw_out[:] = [a.encrypt(nonces[i], p, None) for i, p in enumerate(pieces)]

    def raw_decrypt() -> None:
        a = AESGCM(key)
        for i, c in enumerate(raw_ct):
            a.decrypt(nonces[i], c, None)

    sealed: list[bytes] = []

    def seal() -> None:
        a = AESGCM(key)
        sealed[:] = [envelope.seal_chunk(a, artifact_id, i, count, p) for i, p in enumerate(pieces)]

    seal()
    digest = hashlib.sha256(model).hexdigest()
    info = ArtifactInfo(
        artifact_id=artifact_id,
        size=size,
        sha256=digest,
        compression="none",
        compressed_size=size,
        compressed_sha256=digest,
        chunk_size=chunk,
        chunk_count=count,
    )

    def open_() -> None:
        opener = envelope.ChunkOpener(key, info)
        for wire in sealed:
            opener.open(wire)

    def open_reassemble() -> None:
        opener = envelope.ChunkOpener(key, info)
        r = Reassembly.for_artifact(info, max_bytes=size)
        sink = MemorySink(size)
        for wire in sealed:
            c = opener.open_chunk(wire)
            r.add(c.index, c.data, sink, fingerprint=c.tag)
        r.finish(sink)

    mb = size / 1e6
    times = {
        "raw_aesgcm_encrypt": best_of(reps, raw_encrypt),
        "raw_aesgcm_decrypt": best_of(reps, raw_decrypt),
        "seal": best_of(reps, seal),
        "open": best_of(reps, open_),
        "open+reassemble": best_of(max(1, reps // 2), open_reassemble),
    }
    rates = {k: mb / v for k, v in times.items()}
    result = {
        "artifact_mb": round(mb, 1),
        "chunk_kb": args.chunk_kb,
        "chunks": count,
        "seal_mb_s": round(rates["seal"], 1),
        "open_mb_s": round(rates["open"], 1),
        "open_reassemble_mb_s": round(rates["open+reassemble"], 1),
        "raw_aesgcm_mb_s": round(rates["raw_aesgcm_decrypt"], 1),
        "raw_aesgcm_encrypt_mb_s": round(rates["raw_aesgcm_encrypt"], 1),
        "open_vs_raw": round(rates["open"] / rates["raw_aesgcm_decrypt"], 3),
        "seal_vs_raw": round(rates["seal"] / rates["raw_aesgcm_encrypt"], 3),
        "open_reassemble_vs_raw": round(rates["open+reassemble"] / rates["raw_aesgcm_decrypt"], 3),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}",
        "quick": args.quick,
    }
    base = {"seal": "raw_aesgcm_encrypt", "open": "raw_aesgcm_decrypt", "open+reassemble": "raw_aesgcm_decrypt"}
    print(f"envelope v1: {mb:.0f} MB artifact, {count} chunks of {args.chunk_kb} KB (best of {reps})")
    print(f"{'path':<22}{'MB/s':>10}{'vs raw':>10}")
    for name, rate in rates.items():
        ratio = f"{rate / rates[base[name]]:.2f}x" if name in base else "1.00x"
        print(f"{name:<22}{rate:>10.0f}{ratio:>10}")
    verdict = "meets" if result["open_vs_raw"] >= 0.7 else "MISSES"
    print(f"open vs raw AES-GCM: {result['open_vs_raw']:.2f}x ({verdict} the >= 0.7x target)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
