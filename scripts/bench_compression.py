"""Compression: what edgefleet ships vs the field's own tools, per real model and CPU profile.

    .venv/bin/python scripts/bench_compression.py [--quick] [--json PATH] [--models a,b] [--profiles x,y]

For each real model (scripts/fetch_models.py cache): ``edgefleet build NAME --profile all`` through the
catalog (timed: ``build_seconds``), then for each CPU profile this machine stands in for (same
architecture and ISA features; server.compression.host.stand_in) one row per variant:

  fp32                   the source model as registered
  ort_default            ONNX Runtime's quantizer as its docs show it, defaults only: quantize_dynamic for
                         transformers and recurrent models, quantize_static with the calibration split for CNNs
  nncf                   nncf.quantize(model, calibration) with NNCF's defaults (ONNX models)
  nncf_accuracy_control  nncf.quantize_with_accuracy_control with the gate's own metric and budget,
                         validated on the evaluation split as a user would (so it sees the data it is
                         judged on); stopped after --ac-timeout seconds
  litert_default         LiteRT Quantizer's default dynamic_wi8_afp32 recipe (.tflite models)
  litert_weight_only     LiteRT Quantizer's weight_only_wi8_afp32 recipe (int8 weights, float compute)
  edgefleet              what the build stored for the profile (the gate's choice; fp32 when nothing passes)

Every row: ``size_bytes`` (the file a device downloads), ``ota_bytes`` (after the transfer codec),
``latency_ms`` (median single request, 1 thread; the variants of a profile timed in alternation so that
load drift hits them alike), ``fidelity`` on the evaluation split against fp32 in the model's own gate
metric, ``passed_gate``, ``recipe``. ``--quick``: digits and selfie, MinMax calibration only, no
accuracy-control peer, fewer timing runs (under a minute).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.compression import codec, litert_tools, nncf_tools
from server.compression.data import Dataset, load_dataset
from server.compression.gate import GateSpec, check_fidelity, measure_fidelity
from server.compression.host import stand_in
from server.compression.pipeline import inspect_source
from server.compression.runners import open_runner, run_dataset, sample_feed
from server.model_ops import build_model
from server.profiles import load_profiles
from server.registry.catalog import Catalog
from tests.support.models import ModelCacheMissing, RealModel, real_model

ALL_MODELS = ("minilm", "ppocr_det", "digits", "selfie", "face_det", "face_mesh", "vad", "ppocr_rec")
QUICK_MODELS = ("digits", "selfie")
DYNAMIC_TASKS = ("embedding", "voice-activity")  # ORT's advice: dynamic for transformers and RNNs


def _batch(path: Path, fmt: str) -> int:
    first = open_runner(path, fmt).inputs[0].shape
    return first[0] if first and first[0] > 0 else 1


def ort_default(rm: RealModel, calibration: Dataset, out: Path) -> str:
    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static  # noqa: PLC0415

    if rm.task in DYNAMIC_TASKS:
        quantize_dynamic(str(rm.path), str(out))
        return "quantize_dynamic(defaults)"
    it = calibration.batches(_batch(rm.path, "onnx"))

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, Any] | None:
            return next(it, None)

    quantize_static(str(rm.path), str(out), Reader())
    return "quantize_static(defaults)"


def nncf_default(rm: RealModel, calibration: Dataset, out: Path) -> str:
    nncf_tools.quantize(rm.path, out, calibration, batch=_batch(rm.path, "onnx"), strip=False)
    return "nncf.quantize(defaults)"


def _ac_child(rm_name: str, out: str, gate: dict[str, Any], limit: int | None) -> None:
    rm = real_model(rm_name)
    source = inspect_source(rm.path)
    ev = load_dataset(rm.evaluation, source.inputs).take(limit)
    cal = load_dataset(rm.calibration, source.inputs, role="calibration")
    reference = run_dataset(open_runner(rm.path, "onnx"), ev)
    nncf_tools.quantize_with_accuracy_control(rm.path, Path(out), cal, validation=ev, reference=reference,
                                              gate=GateSpec.from_dict(gate), batch=_batch(rm.path, "onnx"))


def nncf_accuracy_control(rm: RealModel, gate: GateSpec, out: Path, limit: int | None, timeout: float) -> str:
    """In a child process, so that a run past ``timeout`` can be stopped."""
    proc = multiprocessing.get_context("fork").Process(target=_ac_child,
                                                       args=(rm.name, str(out), gate.to_dict(), limit))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise TimeoutError(f"stopped after {timeout:.0f} s")
    if proc.exitcode != 0 or not out.is_file():
        raise RuntimeError(f"exit code {proc.exitcode}")
    return f"quantize_with_accuracy_control(max_drop per the gate, {gate.metric})"


def litert_peer(rm: RealModel, recipe: str) -> Any:
    """A LiteRT Quantizer recipe as a peer: writes ``out`` and says what it ran."""
    def make(out: Path) -> str:
        litert_tools.quantize(rm.path, out, recipe)
        return f"litert_quantizer {recipe}"
    return make


def interleaved_latency(paths: list[Path], fmt: str, ev: Dataset, runs: int) -> list[list[float]]:
    """Each variant's request times (ms), the variants run one after the other in every round."""
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
    return times


def latency_figures(times: list[float], fp32: list[float]) -> dict[str, float]:
    """Median, best, and the ratios to fp32: of medians, of bests, and the median over rounds of the paired
    ratio (the variant and fp32 timed back to back in the same round: the same moment of the load)."""
    return {"latency_ms": statistics.median(times), "latency_best_ms": min(times),
            "latency_ratio": statistics.median(times) / statistics.median(fp32),
            "latency_best_ratio": min(times) / min(fp32),
            "latency_paired_ratio": statistics.median(t / f for t, f in zip(times, fp32, strict=True))}


def measure(path: Path, fmt: str, ev: Dataset, reference: list[Any], gate: GateSpec) -> dict[str, Any]:
    fid = measure_fidelity(reference, run_dataset(open_runner(path, fmt), ev), gate, ev.labels)
    data = path.read_bytes()
    return {"size_bytes": len(data), "ota_bytes": codec.choose_codec(data).compressed_size,
            "fidelity": fid.value, "passed_gate": check_fidelity(fid, gate) is None}


def bench_model(rm: RealModel, wanted: list[str], args: argparse.Namespace, work: Path) -> tuple[list[dict[str, Any]],
                                                                                                  float | None]:
    profiles = load_profiles()
    source = inspect_source(rm.path)
    fmt = source.format
    gate = GateSpec(metric=rm.metric)
    limit = 200 if args.quick else None
    ev = load_dataset(rm.evaluation, source.inputs).take(limit)
    cal = load_dataset(rm.calibration, source.inputs, role="calibration")
    reference = run_dataset(open_runner(rm.path, fmt), ev)
    variants: dict[str, tuple[Path | None, str, dict[str, Any] | None]] = {}
    variants["fp32"] = (rm.path, "source", measure(rm.path, fmt, ev, reference, gate))
    peers: list[tuple[str, Any]] = []
    if fmt == "onnx":
        peers += [("ort_default", lambda out: ort_default(rm, cal, out)),
                  ("nncf", lambda out: nncf_default(rm, cal, out))]
        if not args.quick:
            peers.append(("nncf_accuracy_control",
                          lambda out: nncf_accuracy_control(rm, gate, out, limit, args.ac_timeout)))
    else:
        peers += [("litert_default", litert_peer(rm, "dynamic_wi8_afp32")),
                  ("litert_weight_only", litert_peer(rm, "weight_only_wi8_afp32"))]
    for variant, make in peers:
        out = work / f"{variant}{rm.path.suffix}"
        t0 = time.monotonic()
        try:
            how = make(out)
            variants[variant] = (out, f"{how}; {time.monotonic() - t0:.0f} s",
                                 measure(out, fmt, ev, reference, gate))
        except Exception as exc:  # a peer that fails is a row that says so
            variants[variant] = (None, f"failed: {type(exc).__name__}: {str(exc)[:120]}", None)
    # edgefleet build NAME --profile all, through the catalog, as the CLI does it
    home = work / "home"
    catalog = Catalog.open(home)
    try:
        catalog.add_model(rm.path, rm.name, calibration=rm.calibration, evaluation=rm.evaluation, gate=gate)
    finally:
        catalog.close()
    body: dict[str, Any] = {"profile": "all", "latency_runs": args.runs}
    if args.quick:
        body["calibration_methods"] = ["minmax"]
    t0 = time.monotonic()
    built = build_model(home, f"{rm.name}:1", body)
    build_seconds = time.monotonic() - t0
    errors = {r["profile"]: r["error"] for r in built["results"] if "error" in r}
    rows: list[dict[str, Any]] = []
    catalog = Catalog.open(home)
    try:
        for pid in wanted:
            if fmt not in profiles[pid].format_preference:
                continue
            b = catalog.get_build(rm.name, 1, pid)
            ours = (b.path, b.variant, measure(b.path, fmt, ev, reference, gate)) if b else \
                (None, f"not built: {errors.get(pid, '?')}", None)
            timed = {"edgefleet": ours, **variants}
            names = [n for n, (p, _, _) in timed.items() if p is not None]
            lat = dict(zip(names, interleaved_latency([timed[n][0] for n in names], fmt, ev, args.runs),  # type: ignore[misc]
                           strict=True))
            base = variants["fp32"][2]
            assert base is not None
            for name in ["fp32", *[n for n in variants if n != "fp32"], "edgefleet"]:
                _path, how, m = timed[name]
                row: dict[str, Any] = {"model": rm.name, "profile": pid, "variant": name, "metric": gate.metric,
                                       "recipe": how, "precision": None}
                if name == "edgefleet" and b is not None:
                    row["precision"] = b.runtime.extra.get("precision")
                if m is not None:
                    row |= m | {"size_ratio": m["size_bytes"] / base["size_bytes"]} \
                        | latency_figures(lat[name], lat["fp32"])
                rows.append(row)
    finally:
        catalog.close()
    return rows, build_seconds


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's done-when, counted on these rows."""
    ours = [r for r in rows if r["variant"] == "edgefleet" and "size_bytes" in r]
    small = sorted({r["model"] for r in ours if r["passed_gate"] and r["size_ratio"] <= 0.6})
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in ours:
        by_model.setdefault(r["model"], []).append(r)
    def fast(key: str) -> list[str]:
        return sorted(m for m, rs in by_model.items() if all(r["precision"] == "int8" and r[key] <= 0.8 for r in rs))

    beaten = []
    for r in rows:
        if r["variant"] in ("fp32", "edgefleet") or not r.get("passed_gate"):
            continue
        mine = next((o for o in ours if o["model"] == r["model"] and o["profile"] == r["profile"]), None)
        if mine is None or (r["size_bytes"] < mine["size_bytes"] and r["fidelity"] >= mine["fidelity"]):
            beaten.append(f"{r['model']}/{r['profile']}/{r['variant']}")
    return {"passing_at_most_0.6x": small, "int8_at_most_0.8x_latency": fast("latency_ratio"),
            "int8_at_most_0.8x_latency_paired": fast("latency_paired_ratio"), "peer_beats_edgefleet": beaten}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits and selfie only, fewer runs (under a minute)")
    parser.add_argument("--json", type=Path, help="write {machine, build_seconds, rows, targets} to this path")
    parser.add_argument("--models", help=f"comma-separated subset of {', '.join(ALL_MODELS)}")
    parser.add_argument("--profiles", help="comma-separated profile ids (default: those this machine stands in for)")
    parser.add_argument("--ac-timeout", type=float, default=240.0,
                        help="seconds before NNCF accuracy control is stopped (per model)")
    args = parser.parse_args()
    args.runs = 10 if args.quick else 30
    models = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else ALL_MODELS)
    profiles = load_profiles()
    wanted = args.profiles.split(",") if args.profiles else [p for p in profiles if stand_in(profiles[p])[0]]
    rows: list[dict[str, Any]] = []
    build_seconds: dict[str, float] = {}
    t_start = time.monotonic()
    for name in models:
        try:
            rm = real_model(name)
        except ModelCacheMissing as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
            continue
        print(f"[bench_compression] {name} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            model_rows, seconds = bench_model(rm, wanted, args, Path(tmp))
        rows += model_rows
        if seconds is not None:
            build_seconds[name] = round(seconds, 1)
    elapsed = time.monotonic() - t_start
    machine = f"{platform.machine()} {platform.processor() or ''}, python {platform.python_version()}"
    print(f"machine: {machine}; {elapsed:.0f} s; build --profile all (s): {build_seconds}\n")
    header = (f"{'model':10} {'profile':12} {'variant':22} {'size':>11} {'x src':>6} {'lat ms':>8} {'x fp32':>6} "
              f"{'best x':>6} {'pair x':>6} {'metric':>8} {'fidelity':>8} {'pass':>5}  recipe")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "size_bytes" not in r:
            print(f"{r['model']:10} {r['profile']:12} {r['variant']:22} {'':>11} {'':>6} {'':>8} {'':>6} "
                  f"{'':>6} {'':>6} {'':>8} {'':>8} {'':>5}  {r['recipe'][:60]}")
            continue
        print(f"{r['model']:10} {r['profile']:12} {r['variant']:22} {r['size_bytes']:>11,} {r['size_ratio']:>6.3f} "
              f"{r['latency_ms']:>8.3f} {r['latency_ratio']:>6.2f} "
              f"{r['latency_best_ratio']:>6.2f} {r['latency_paired_ratio']:>6.2f} {r['metric']:>8} "
              f"{r['fidelity']:>8.4f} "
              f"{'yes' if r['passed_gate'] else 'no':>5}  {r['recipe'][:60]}")
    summary = targets(rows)
    print(f"\ntargets: {json.dumps(summary)}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "seconds": round(elapsed, 1),
                                         "build_seconds": build_seconds, "rows": rows, "targets": summary},
                                        indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
