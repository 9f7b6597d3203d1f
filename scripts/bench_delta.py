#!/usr/bin/env python3
"""Delta updates on real model version pairs: EFD1 patch vs full artifact vs xdelta3 (and bsdiff, zstd).

    .venv/bin/python scripts/bench_delta.py [--quick] [--json [PATH]] [--encodings]

Pairs (base = the cached digits model, int8 static QDQ as the pipeline's ORT quantizer builds it; the trained
versions come from scripts/make_delta_pairs.py, torch on the digits training split):
    head        new classification head on the same backbone, int8, scales reused where the gate passes
    finetune    full fine-tune of every weight, int8, scales reused where the gate passes
    finetune_fresh  the same fine-tune quantized with a fresh calibration (no reuse), for reference
    recalib     same weights, re-calibrated on other data (activation scales change)
    recalib_ppocr_det  the same for the 4.7 MB PP-OCR detector (8 vs 8 other calibration images): a larger file,
                so apply_seconds vs full_install_seconds means something on a busy machine
    control     an unrelated model (MLP): the delta is not worth it, the full artifact goes
Rows: pair, full_bytes (the full sealed artifact: lzma + chunk framing + AEAD tags), delta_bytes (the sealed EFD1
patch), xdelta3_bytes (xdelta3 -9 -S lzma on the same two files, sealed the same way), bsdiff_bytes,
zstd_patch_bytes (zstd -19 --patch-from), ratio, sent (delta|full), apply_seconds (decrypt + apply into a file,
base and target hashed), full_install_seconds (decrypt + decompress + hash + write of the full artifact), sha_ok.
A baseline tool that is not installed prints NOT RUN (scripts/setup installs xdelta3 and bsdiff).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from agent.protocol import delta as fmt
from agent.protocol.envelope import ChunkOpener, decompress, seal_artifact
from server.compression.data import Dataset
from server.compression.delta_quant import reuse_scales
from server.compression.onnx_tools import quantize_static
from server.delta import DEFAULT_MAX_RATIO, delta_ops, make_delta, worth_sending

CHUNK = 64 * 1024


def sealed_size(data: bytes, compression: str) -> int:
    return sum(len(c) for c in seal_artifact(data, chunk_size=CHUNK, compression=compression).chunks)


def tool_size(argv: Callable[[Path, Path, Path], list[str]], base: bytes, target: bytes) -> int | None:
    name = argv(Path("a"), Path("b"), Path("c"))[0]
    if shutil.which(name) is None:
        print(f"{name}: NOT RUN (not installed; scripts/setup installs it)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        a, b, c = Path(tmp, "base"), Path(tmp, "target"), Path(tmp, "patch")
        a.write_bytes(base)
        b.write_bytes(target)
        subprocess.run(argv(a, b, c), check=True, capture_output=True)
        return sealed_size(c.read_bytes(), "none")


def xdelta3(a: Path, b: Path, c: Path) -> list[str]:
    return ["xdelta3", "-e", "-9", "-S", "lzma", "-f", "-s", str(a), str(b), str(c)]


def bsdiff(a: Path, b: Path, c: Path) -> list[str]:
    return ["bsdiff", str(a), str(b), str(c)]


def zstd_patch(a: Path, b: Path, c: Path) -> list[str]:
    return ["zstd", "-q", "-f", "-19", "--patch-from", str(a), str(b), "-o", str(c)]


def median_time(reps: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timings(base: bytes, target: bytes, patch: bytes, reps: int, tmp: Path) -> tuple[float, float, bool]:
    full = seal_artifact(target, chunk_size=CHUNK, compression="lzma")
    dl = seal_artifact(patch, chunk_size=CHUNK, compression="none")
    base_path = tmp / "base.bin"
    base_path.write_bytes(base)
    base_sha = hashlib.sha256(base).hexdigest()
    ok = [True]

    def install_full() -> None:
        opener = ChunkOpener(full.data_key, full.info)
        packed = b"".join(opener.open(c)[1] for c in full.chunks)
        model = decompress(packed, "lzma", expected_size=full.info.size)
        if hashlib.sha256(model).hexdigest() != full.info.sha256:
            ok[0] = False
        with (tmp / "full.out").open("wb") as f:
            f.write(model)

    def apply_delta() -> None:
        opener = ChunkOpener(dl.data_key, dl.info)
        pieces = (opener.open(c)[1] for c in dl.chunks)
        with base_path.open("rb") as b, (tmp / "delta.out").open("wb") as out:
            fmt.apply_patch(pieces, b, out, base_sha256=base_sha, target_sha256=full.info.sha256, max_size=1 << 30)

    full_s = median_time(reps, install_full)
    apply_s = median_time(reps, apply_delta)
    sha_ok = ok[0] and hashlib.sha256((tmp / "delta.out").read_bytes()).hexdigest() == full.info.sha256
    return apply_s, full_s, sha_ok


def load_npz(path: Path) -> Dataset:
    with np.load(path) as z:
        return Dataset({"pixels": z["pixels"]}, z["labels"])


def accuracy(model: Path, data: Dataset) -> float:
    import onnxruntime as ort  # noqa: PLC0415

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"pixels": data.arrays["pixels"]})[0]
    assert data.labels is not None
    return float((logits.argmax(1) == data.labels).mean())


def quantize(src: Path, dst: Path, calib: Dataset, batch: int = 50) -> Path:
    quantize_static(src, dst, calib, method="minmax", signed_activations=False, reduce_range=False, batch=batch)
    return dst


def make_pairs(work: Path) -> dict[str, tuple[Path, Path]]:
    import fetch_models  # noqa: PLC0415
    from make_delta_pairs import ensure_pairs  # noqa: PLC0415

    pairs_dir = ensure_pairs()
    digits = fetch_models.cache_root() / "models" / "digits"
    calib = load_npz(digits / "calibration.npz")
    evaluation = load_npz(digits / "evaluation.npz")
    base_q = quantize(digits / "model.onnx", work / "base.int8.onnx", calib)

    def reused(name: str) -> Path:
        fresh = quantize(pairs_dir / f"{name}.onnx", work / f"{name}.fresh.onnx", calib)
        floor = accuracy(fresh, evaluation) - 0.01
        out = work / f"{name}.reuse.onnx"
        level = reuse_scales(fresh, pairs_dir / f"{name}.onnx", base_q, out, lambda p: accuracy(p, evaluation) >= floor)
        print(f"{name}: scale reuse level {level!r} (gate: accuracy >= fresh - 0.01 = {floor:.3f})")
        return out

    other = Dataset({"pixels": evaluation.arrays["pixels"][:200]}, evaluation.labels[:200])
    recal = quantize(digits / "model.onnx", work / "recalib.onnx", other)
    control = quantize(pairs_dir / "control.onnx", work / "control.onnx", calib)
    # a larger real model (4.7 MB PP-OCR detector) re-calibrated on other images: apply time vs install time
    ocr = fetch_models.cache_root() / "models" / "ppocr_det"
    with np.load(ocr / "calibration.npz") as z:
        images = z["x"]
    ocr_a = quantize(ocr / "model.onnx", work / "ocr_a.onnx", Dataset({"x": images[:8]}), batch=1)
    ocr_b = quantize(ocr / "model.onnx", work / "ocr_b.onnx", Dataset({"x": images[8:16]}), batch=1)
    return {
        "recalib_ppocr_det": (ocr_a, ocr_b),
        "head": (base_q, reused("head")),
        "finetune": (base_q, reused("finetune")),
        "finetune_fresh": (base_q, work / "finetune.fresh.onnx"),
        "recalib": (base_q, recal),
        "control": (base_q, control),
    }


def encodings(base: bytes, target: bytes) -> dict[str, int]:
    """Step-1 measurements: the same tensor-aligned op stream under other compressors, and a no-alignment diff."""
    ops = delta_ops(base, target, "onnx")
    stream = fmt.encode_ops(ops)
    out = {"ops_xz": len(lzma.compress(stream, preset=9 | lzma.PRESET_EXTREME))}
    try:
        import zstandard  # noqa: PLC0415

        out["ops_zstd19"] = len(zstandard.ZstdCompressor(level=19).compress(stream))
    except ImportError:
        print("zstandard: NOT RUN (python package not installed)")
    raw = delta_ops(base, target, "raw")
    out["bytewise_xz"] = len(lzma.compress(fmt.encode_ops(raw), preset=9 | lzma.PRESET_EXTREME))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    ap.add_argument("--json", nargs="?", const="-", help="write rows as JSON (to PATH, or stdout)")
    ap.add_argument("--encodings", action="store_true", help="also print the encoding comparison")
    args = ap.parse_args()
    reps = 5 if args.quick else 21
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for pair, (b_path, t_path) in make_pairs(tmp).items():
            base, target = b_path.read_bytes(), t_path.read_bytes()
            patch = make_delta(base, target, "onnx")
            full_bytes = sealed_size(target, "lzma")
            delta_bytes = sealed_size(patch, "none")
            apply_s, full_s, sha_ok = timings(base, target, patch, reps, tmp)
            row: dict[str, Any] = {
                "pair": pair,
                "full_bytes": full_bytes,
                "delta_bytes": delta_bytes,
                "xdelta3_bytes": tool_size(xdelta3, base, target),
                "bsdiff_bytes": tool_size(bsdiff, base, target),
                "zstd_patch_bytes": tool_size(zstd_patch, base, target),
                "ratio": round(delta_bytes / full_bytes, 4),
                "sent": "delta" if worth_sending(delta_bytes, full_bytes) else "full",
                "apply_seconds": round(apply_s, 6),
                "full_install_seconds": round(full_s, 6),
                "sha_ok": sha_ok,
            }
            if args.encodings:
                row["encodings"] = encodings(base, target)
            rows.append(row)
    cols = ["pair", "full_bytes", "delta_bytes", "xdelta3_bytes", "bsdiff_bytes", "zstd_patch_bytes", "ratio",
            "sent", "apply_seconds", "full_install_seconds", "sha_ok"]  # fmt: skip
    print(" ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]!s:>14}" for c in cols))
        if "encodings" in r:
            print(f"{'':>14} encodings: {r['encodings']}")
    print(f"delta sent when <= {DEFAULT_MAX_RATIO:.0%} of the full artifact; chunk size {CHUNK} bytes")
    if args.json:
        text = json.dumps({"chunk_size": CHUNK, "rows": rows}, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
