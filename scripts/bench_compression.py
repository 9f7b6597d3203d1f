"""Compression: fp32 vs ONNX Runtime's default quantizer vs edgefleet's gated choice, per model and profile.

    .venv/bin/python scripts/bench_compression.py [--quick] [--json PATH] [--models a,b] [--profiles x,y]

For each real model (scripts/fetch_models.py cache) and each CPU profile this machine can stand in
for (same architecture and ISA features; see server.compression.pipeline.stand_in), in one run:

  fp32         the source model as registered
  ort_default  ONNX Runtime's quantizer called the way its docs show, defaults only: quantize_dynamic
               for transformers (MiniLM), quantize_static with the calibration data for CNNs;
               for .tflite, LiteRT Quantizer's default dynamic_wi8_afp32 recipe
  edgefleet    what `edgefleet build` ships for the profile (the gate's choice; fp32 when nothing passes)

Each row: size, median single-request latency (1 thread, the three models timed in alternation), fidelity on the
evaluation split against fp32 (accuracy when labelled, else min cosine / mean IoU: see `metric`), and
ratios to fp32. --quick: digits and selfie only, MinMax calibration, fewer timing runs (under a minute).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.compression import litert_tools
from server.compression.data import Dataset, load_dataset
from server.compression.gate import GateSpec, measure_fidelity
from server.compression.pipeline import BuildOptions, build_profile, inspect_source, stand_in
from server.compression.runners import open_runner, run_dataset, sample_feed
from server.profiles import load_profiles
from tests.support.models import ModelCacheMissing, real_model

ALL_MODELS = ("minilm", "ppocr_det", "digits", "selfie")
QUICK_MODELS = ("digits", "selfie")


def ort_default(model: Path, fmt: str, task: str, calibration: Dataset, out: Path) -> str:
    """The quantizer a user reaches for first, with its defaults; returns what was called."""
    if fmt == "tflite":
        litert_tools.quantize(model, out, "dynamic_wi8_afp32")
        return "litert_quantizer dynamic_wi8_afp32"
    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static  # noqa: PLC0415

    if task == "embedding":
        quantize_dynamic(str(model), str(out))
        return "quantize_dynamic(defaults)"
    runner = open_runner(model, fmt)
    first = runner.inputs[0].shape
    batch = first[0] if first and first[0] > 0 else 1
    it = calibration.batches(batch)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, Any] | None:
            return next(it, None)

    quantize_static(str(model), str(out), Reader())
    return "quantize_static(defaults)"


def fidelity(path: Path, fmt: str, ev: Dataset, reference: list[Any], gate: GateSpec) -> dict[str, Any]:
    fid = measure_fidelity(reference, run_dataset(open_runner(path, fmt), ev), gate, ev.labels)
    return {"size_bytes": path.stat().st_size, "fidelity": fid.value, "min_cosine": fid.min_cosine,
            "top1_agreement": fid.top1_agreement}


def interleaved_latency(paths: list[Path], fmt: str, ev: Dataset, runs: int) -> list[float]:
    """Median single-request latency of each model, timed in alternation (round r runs every model once),
    so a machine whose load drifts during the run affects all of them alike."""
    runners = [open_runner(p, fmt) for p in paths]
    feeds = [sample_feed(r, ev) for r in runners]
    for r, f in zip(runners, feeds, strict=True):
        for _ in range(3):
            r.run(f)
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(runs):
        for i, (r, f) in enumerate(zip(runners, feeds, strict=True)):
            t0 = time.perf_counter()
            r.run(f)
            times[i].append((time.perf_counter() - t0) * 1000.0)
    return [statistics.median(t) for t in times]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits and selfie only, fewer runs (under a minute)")
    parser.add_argument("--json", type=Path, help="write the rows as JSON to this path")
    parser.add_argument("--models", help=f"comma-separated subset of {', '.join(ALL_MODELS)}")
    parser.add_argument("--profiles", help="comma-separated profile ids (default: those this machine stands in for)")
    args = parser.parse_args()
    models = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else ALL_MODELS)
    profiles = load_profiles()
    wanted = args.profiles.split(",") if args.profiles else [p for p in profiles if stand_in(profiles[p])[0]]
    runs = 10 if args.quick else 40
    options = BuildOptions(methods=("minmax",) if args.quick else ("minmax", "percentile", "entropy"),
                           latency_runs=runs, evaluation_limit=200 if args.quick else None)
    rows: list[dict[str, Any]] = []
    t_start = time.monotonic()
    for name in models:
        try:
            rm = real_model(name)
        except ModelCacheMissing as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
            continue
        source = inspect_source(rm.path)
        metric = {"accuracy": "accuracy", "iou": "iou"}.get(rm.metric, "cosine")
        gate = GateSpec(metric=metric)
        ev = load_dataset(rm.evaluation, source.inputs).take(options.evaluation_limit)
        cal = load_dataset(rm.calibration, source.inputs, role="calibration").take(options.calibration_limit)
        reference = run_dataset(open_runner(rm.path, source.format), ev)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            fp32 = fidelity(rm.path, source.format, ev, reference, gate)
            default_path = work / f"ort_default{rm.path.suffix}"
            try:
                method = ort_default(rm.path, source.format, rm.task, cal, default_path)
                default: dict[str, Any] | None = fidelity(default_path, source.format, ev, reference, gate)
            except Exception as exc:
                method, default = f"failed: {type(exc).__name__}: {str(exc)[:100]}", None
            for pid in wanted:
                profile = profiles[pid]
                if source.format not in profile.format_preference:
                    continue
                bdir = work / pid
                bdir.mkdir()
                result = build_profile(source, profile, gate, evaluation=ev, calibration=cal, workdir=bdir,
                                       options=options)
                assert result.chosen.path is not None
                ours = fidelity(result.chosen.path, source.format, ev, reference, gate)
                ours["ota_size_bytes"] = result.ota_size
                timed = [rm.path, result.chosen.path] + ([default_path] if default is not None else [])
                lat = interleaved_latency(timed, source.format, ev, runs)
                measured = [dict(fp32, latency_ms=lat[0]), dict(ours, latency_ms=lat[1])]
                measured.append(dict(default, latency_ms=lat[2]) if default is not None else {})
                for variant, m, how in (("fp32", measured[0], "source"),
                                        ("ort_default", measured[2] or None, method),
                                        ("edgefleet", measured[1], result.chosen.recipe.name)):
                    row: dict[str, Any] = {"model": name, "profile": pid, "variant": variant, "method": how,
                                           "metric": metric}
                    if m is not None:
                        row.update(m)
                        row["size_ratio"] = m["size_bytes"] / fp32["size_bytes"]
                        row["latency_ratio"] = m["latency_ms"] / measured[0]["latency_ms"]
                    rows.append(row)
    elapsed = time.monotonic() - t_start
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}; "
          f"{elapsed:.0f} s\n")
    header = (f"{'model':10} {'profile':12} {'variant':12} {'method':34} {'size':>11} {'x fp32':>7} "
              f"{'lat ms':>8} {'x fp32':>7} {'metric':>8} {'fidelity':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "size_bytes" not in r:
            print(f"{r['model']:10} {r['profile']:12} {r['variant']:12} {r['method'][:34]:34}")
            continue
        print(f"{r['model']:10} {r['profile']:12} {r['variant']:12} {r['method'][:34]:34} {r['size_bytes']:>11,} "
              f"{r['size_ratio']:>7.3f} {r['latency_ms']:>8.3f} {r['latency_ratio']:>7.2f} {r['metric']:>8} "
              f"{r['fidelity']:>8.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
