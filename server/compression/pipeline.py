"""Build one profile's variant: plan recipes, produce each candidate, gate it, pick what ships.

    result = build_profile(source, profile, gate, evaluation=ev, calibration=cal, workdir=tmp)
    result.chosen.path        # the file to register (uncompressed; sealing compresses it)
    result.provenance         # everything needed to trust it later

Nothing here touches the registry; ``server.registry.catalog`` stores the result atomically.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import math
import platform
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.protocol.messages import GoldenCase, HealthSpec, RuntimeSpec, TensorData, TensorSpec
from server.compression import codec, litert_tools, onnx_tools
from server.compression.data import Dataset
from server.compression.gate import Fidelity, GateSpec, Scored, check_fidelity, measure_fidelity, select
from server.compression.recipes import CALIBRATION_METHODS, Recipe, plan
from server.compression.runners import Runner, latency_ms, open_runner, run_dataset, sample_feed
from server.errors import DatasetError, GateError, ModelError, ServerError, UnsupportedOpError
from server.profiles import DeviceProfile, version_tuple

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
#: Golden cases ride in the desired state: only for small tensors.
MAX_GOLDEN_BYTES = 32 * 1024
#: Fallback rounds: share of the scored nodes kept in float.
FALLBACK_SHARES = (0.05, 0.15, 0.30)


@dataclass(frozen=True)
class SourceModel:
    path: Path
    format: str  # onnx | tflite
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int | None
    ops: frozenset[str]
    sha256: str
    size: int


@dataclass(frozen=True)
class BuildOptions:
    methods: tuple[str, ...] = CALIBRATION_METHODS
    pruning: bool = True
    fallback: bool = True
    calibration_limit: int = 200
    evaluation_limit: int | None = None
    latency_runs: int = 30
    only: tuple[str, ...] = ()  # restrict to these recipe names (tests, benchmarks)
    #: The evaluation data is synthetic: when the model does not run on it, ship fp32 unchecked rather than nothing.
    synthetic: bool = False


@dataclass(frozen=True)
class Candidate:
    recipe: Recipe
    status: str  # passed | failed | error
    reason: str | None = None
    path: Path | None = None
    fidelity: Fidelity | None = None
    size_bytes: int = 0
    compressed_estimate: int = 0
    latency_ms: float | None = None
    opset: int | None = None
    sha256: str = ""
    build_s: float = 0.0
    latency_best_ms: float | None = None  # what selection compares: the best run resists a busy machine

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.to_dict(),
            "status": self.status,
            "reason": self.reason,
            "fidelity": self.fidelity.to_dict() if self.fidelity else None,
            "size_bytes": self.size_bytes,
            "compressed_estimate_bytes": self.compressed_estimate,
            "latency_ms": self.latency_ms,
            "latency_best_ms": self.latency_best_ms,
            "opset": self.opset,
            "sha256": self.sha256,
            "build_s": round(self.build_s, 3),
        }


@dataclass(frozen=True)
class ProfileResult:
    profile: str
    chosen: Candidate
    fell_back: bool
    candidates: tuple[Candidate, ...]
    compression: str
    ota_size: int
    runtime: RuntimeSpec
    health: HealthSpec
    provenance: dict[str, Any] = field(default_factory=dict)


# -- the host as a stand-in ---------------------------------------------------------------------------


def host_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def stand_in(profile: DeviceProfile) -> tuple[bool, str]:
    """Whether latency measured here says something about the profile; the reason either way."""
    if profile.gpu or profile.accelerator:
        return False, f"{profile.id} runs on {profile.gpu or profile.accelerator}, which this machine lacks"
    if profile.arch != host_arch():
        return False, f"{profile.id} is {profile.arch}, this machine is {host_arch()}"
    flags = host_flags()
    aliases = {"neon": "asimd"}
    missing = [f for f in profile.isa_features if f not in flags and aliases.get(f) not in flags]
    if missing:
        return False, f"this machine lacks {', '.join(missing)}"
    extra = sorted({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"} & flags - set(profile.isa_features))
    note = f" (this machine also has {', '.join(extra)}: int8 timings are optimistic)" if extra else ""
    return True, f"measured on this {host_arch()} machine, 1 thread{note}"


# -- helpers ------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "0"


def inspect_source(path: Path) -> SourceModel:
    """Load and check a model file (ONNX or .tflite); ModelError says what is wrong."""
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    head = path.read_bytes()[:8] if path.stat().st_size else b""
    if path.suffix == ".tflite" or head[4:8] == litert_tools.TFLITE_MAGIC:
        litert_tools.check(path)
        ins, outs = litert_tools.io_specs(path)
        return SourceModel(path, "tflite", ins, outs, None, frozenset(), _sha256(path), path.stat().st_size)
    model = onnx_tools.load(path)
    ins, outs = onnx_tools.io_specs(model)
    if not ins:
        raise ModelError(f"{path.name} has no inputs")
    return SourceModel(
        path, "onnx", ins, outs, onnx_tools.opset(model), frozenset(onnx_tools.op_types(model)), _sha256(path),
        path.stat().st_size,
    )


def _golden(runner: Runner, feed: dict[str, np.ndarray], precision: str) -> tuple[GoldenCase, ...]:
    if sum(a.nbytes for a in feed.values()) > MAX_GOLDEN_BYTES:
        return ()
    outs = runner.run(feed)
    if sum(o.nbytes for o in outs) > MAX_GOLDEN_BYTES:
        return ()
    scale = max((float(np.abs(o).max()) for o in outs if o.size and o.dtype.kind == "f"), default=1.0)
    rel = 0.01 if precision == "fp32" else 0.05
    atol = float(f"{max(1e-4, rel * scale):.3g}")
    return (
        GoldenCase(
            inputs={k: TensorData(v.dtype.name, v.shape, np.ascontiguousarray(v).tobytes()) for k, v in feed.items()},
            outputs={
                spec.name: TensorData(o.dtype.name, o.shape, np.ascontiguousarray(o).tobytes())
                for spec, o in zip(runner.outputs, outs, strict=False)
            },
            atol=atol,
            rtol=rel,
        ),
    )


# -- the build ----------------------------------------------------------------------------------------


class _Builder:
    def __init__(  # noqa: PLR0917
        self,
        source: SourceModel,
        profile: DeviceProfile,
        gate: GateSpec,
        evaluation: Dataset,
        calibration: Dataset | None,
        workdir: Path,
        options: BuildOptions,
        progress: Progress,
    ) -> None:
        self.source = source
        self.profile = profile
        self.gate = gate
        self.evaluation = evaluation.take(options.evaluation_limit)
        self.calibration = calibration.take(options.calibration_limit) if calibration else None
        self.work = workdir
        self.options = options
        self.progress = progress
        self.runtime_name = "onnxruntime" if source.format == "onnx" else "litert"
        rt = profile.runtime_for_format(source.format)
        if rt is None:
            raise UnsupportedOpError(
                f"profile {profile.id} does not run {source.format} models (formats: "
                f"{', '.join(profile.format_preference)})",
                profile=profile.id,
            )
        self.rt = rt
        self.measure_latency, self.latency_note = stand_in(profile)
        self.reference: list[np.ndarray] = []
        self.fp32_latency: float | None = None
        self.fp32_size = 0
        self.fp32_estimate = 0
        self.base: Path = source.path  # the fp32 model fitted to the profile (ONNX: opset)
        self.pre: Path = source.path  # pre-processed input for the quantizers
        self.notes: list[str] = []
        self.unchecked: str | None = None  # why fp32 could not be run here (synthetic inputs the model refuses)

    # ---- setup

    def prepare(self) -> None:
        if self.gate.metric == "accuracy" and self.evaluation.labels is None:
            raise DatasetError("the accuracy metric needs a 'labels' array in the evaluation data")
        self.progress("reference outputs (fp32)")
        ref_runner = open_runner(self.source.path, self.source.format)
        try:
            self.reference = run_dataset(ref_runner, self.evaluation)
        except ModelError as exc:
            if not self.options.synthetic:
                raise
            # The synthetic values (not the shapes: those follow the model) can be out of the model's domain,
            # e.g. a sample rate it checks. The model itself loaded: it still gets its fp32 build.
            self.unchecked = f"fp32 not run: the model refused synthetic inputs ({exc.message[:200]})"
            self.notes.append(self.unchecked)
        if self.source.format == "onnx":
            assert self.rt.max_opset is not None
            model = onnx_tools.fit_opset(onnx_tools.load(self.source.path), self.rt.max_opset, self.profile.id,
                                         self.runtime_name)
            if onnx_tools.opset(model) != self.source.opset:
                self.notes.append(f"opset converted {self.source.opset} -> {onnx_tools.opset(model)}")
            self.base = self.work / "base.onnx"
            onnx_tools.save(model, self.base)
            self.pre = self.work / "pre.onnx"
            self.progress("pre-processing")
            self.notes.extend(onnx_tools.preprocess(self.base, self.pre))
            self.notes.extend(onnx_tools.raise_opset_for_quantization(self.pre, self.rt.max_opset))

    # ---- candidates

    def produce(self, recipe: Recipe, exclude: Sequence[str] = ()) -> Path:
        ext = ".onnx" if self.source.format == "onnx" else ".tflite"
        out = self.work / f"{recipe.name}{ext}"
        p = recipe.params
        if recipe.kind == "fp32":
            if self.source.format == "onnx":
                onnx_tools.optimize_fp32(self.base, out)
            else:
                shutil.copyfile(self.source.path, out)
        elif recipe.kind == "fp16":
            onnx_tools.to_fp16(self.pre, out)
        elif recipe.kind == "dynamic":
            onnx_tools.quantize_dynamic(self.pre, out, per_channel=p["per_channel"], reduce_range=p["reduce_range"],
                                        op_types=p.get("op_types"), exclude=exclude)
        elif recipe.kind == "static":
            assert self.calibration is not None
            first = self.source.inputs[0].shape
            batch = first[0] if first and first[0] > 0 else 1
            onnx_tools.quantize_static(self.pre, out, self.calibration, method=p["method"],
                                       signed_activations=p["signed_activations"], reduce_range=p["reduce_range"],
                                       per_channel=p["per_channel"], batch=batch, exclude=exclude)
        elif recipe.kind == "nbits":
            onnx_tools.quantize_weight_only(self.pre, out, block_size=p["block_size"],
                                            accuracy_level=p["accuracy_level"], exclude=exclude)
        elif recipe.kind == "prune":
            onnx_tools.prune(self.base, out, p["sparsity"])
        elif recipe.kind == "litert":
            litert_tools.quantize(self.source.path, out, p["recipe"], self.calibration)
        else:  # pragma: no cover - plan() only makes the kinds above
            raise ModelError(f"unknown recipe kind {recipe.kind}")
        return out

    def evaluate(self, recipe: Recipe, exclude: Sequence[str] = ()) -> Candidate:
        self.progress(recipe.name)
        t0 = time.monotonic()
        try:
            path = self.produce(recipe, exclude)
            op_set = None
            if self.source.format == "onnx":
                model = onnx_tools.load(path)
                op_set = onnx_tools.opset(model)
                assert self.rt.max_opset is not None
                if op_set > self.rt.max_opset:
                    return Candidate(recipe, "error", f"opset {op_set} > {self.rt.max_opset} ({self.profile.id})",
                                     opset=op_set, build_s=time.monotonic() - t0)
                onnx_tools.check_ops(model, self.rt.max_opset, self.profile.id, self.runtime_name)
            runner = open_runner(path, self.source.format)
            fid = None
            if self.unchecked is None:
                outputs = run_dataset(runner, self.evaluation)
                fid = measure_fidelity(self.reference, outputs, self.gate, self.evaluation.labels)
            size = path.stat().st_size
            data = path.read_bytes()
            estimate = len(zlib.compress(data, 1))
            latency = best = None
            if self.measure_latency and self.unchecked is None:
                feed = sample_feed(runner, self.evaluation)
                latency, best = latency_ms(runner, feed, runs=self.options.latency_runs)
        except ServerError as exc:
            return Candidate(recipe, "error", exc.message[:300], build_s=time.monotonic() - t0)
        except Exception as exc:  # quantizers raise anything; one broken recipe must not stop the others
            log.info("recipe %s failed", recipe.name, exc_info=True)
            return Candidate(recipe, "error", f"{type(exc).__name__}: {str(exc)[:300]}", build_s=time.monotonic() - t0)
        reason = check_fidelity(fid, self.gate) if fid is not None else None
        if fid is None and recipe.kind != "fp32":
            reason = self.unchecked or "not evaluated"
        if recipe.kind == "fp32":
            self.fp32_size, self.fp32_estimate = size, estimate
        elif reason is None and self.fp32_size and recipe.kind != "prune" and size >= 0.95 * self.fp32_size:
            reason = f"not smaller than fp32 ({size} vs {self.fp32_size} bytes): nothing was quantized"
        elif reason is None and self.fp32_estimate and recipe.kind == "prune" and estimate >= 0.95 * self.fp32_estimate:
            reason = "compresses no better than fp32"
        if reason is None and size > self.profile.max_artifact_bytes:
            reason = f"{size} bytes > the profile's max artifact size {self.profile.max_artifact_bytes}"
        if reason is None and latency is not None and latency > self.profile.latency_budget_ms:
            reason = f"latency {latency:.2f} ms > budget {self.profile.latency_budget_ms} ms"
        return Candidate(
            recipe,
            "passed" if reason is None else "failed",
            reason,
            path,
            fid,
            size,
            estimate,
            latency,
            op_set,
            hashlib.sha256(data).hexdigest(),
            time.monotonic() - t0,
            best,
        )

    def fallback(self, done: list[Candidate]) -> list[Candidate]:
        """Re-quantize the best failing int8 ONNX candidate with its most divergent nodes kept in float.

        Tried when no int8 candidate passed, or when a failing one is smaller than every passing one.
        """
        int8 = [c for c in done if c.recipe.precision == "int8" and c.recipe.kind in ("static", "dynamic")]
        if self.source.format != "onnx" or not int8:
            return []
        # worth it only when a failing candidate would beat every passing int8 one on size
        smallest_pass = min((c.size_bytes for c in int8 if c.passed), default=math.inf)
        scored = [c for c in int8 if c.status == "failed" and c.fidelity is not None and c.path is not None
                  and c.size_bytes < smallest_pass * 0.95]
        if not scored:
            return []
        best = max(scored, key=lambda c: c.fidelity.value if c.fidelity else -math.inf)
        assert best.path is not None
        self.progress(f"{best.recipe.name}: finding divergent nodes")
        first = self.source.inputs[0].shape
        batch = first[0] if first and first[0] > 0 else 1
        try:
            if best.recipe.kind == "dynamic":
                bits = 7 if best.recipe.params.get("reduce_range") else 8
                ranked = onnx_tools.matmul_sensitivity(self.pre, self.evaluation, weight_bits=bits)
            else:
                ranked = onnx_tools.divergent_nodes(self.pre, best.path, self.evaluation, count=10_000, batch=batch)
        except Exception as exc:
            log.info("divergence analysis failed", exc_info=True)
            self.notes.append(f"fallback skipped: divergence analysis failed ({type(exc).__name__})")
            return []
        out: list[Candidate] = []
        previous = 0
        for share in FALLBACK_SHARES:
            k = max(previous + 1, math.ceil(len(ranked) * share))
            if k >= len(ranked):  # keeping every quantized node in float is just fp32
                break
            previous = k
            keep = ranked[:k]
            recipe = replace(
                best.recipe,
                name=f"{best.recipe.name}-fallback{k}",
                params={**best.recipe.params, "float_nodes": keep},
            )
            cand = self.evaluate(recipe, exclude=keep)
            out.append(cand)
            if cand.passed:
                break
        return out


def build_profile(
    source: SourceModel,
    profile: DeviceProfile,
    gate: GateSpec,
    *,
    evaluation: Dataset,
    calibration: Dataset | None,
    workdir: Path,
    options: BuildOptions | None = None,
    progress: Progress | None = None,
) -> ProfileResult:
    """Every recipe the profile allows, gated; the best passing one (else fp32) with provenance."""
    opts = options or BuildOptions()
    b = _Builder(source, profile, gate, evaluation, calibration, workdir, opts, progress or (lambda _m: None))
    recipes = plan(profile, source.format, ops=source.ops, has_calibration=calibration is not None,
                   methods=opts.methods, pruning=opts.pruning)
    if opts.only:
        recipes = [r for r in recipes if r.name in opts.only or r.name == "fp32"]
    if not recipes:
        raise UnsupportedOpError(
            f"profile {profile.id} allows {', '.join(profile.allowed_precisions)}, and no recipe for a "
            f"{source.format} model produces that (calibration data given: {calibration is not None})",
            profile=profile.id,
        )
    b.prepare()
    candidates = [b.evaluate(r) for r in recipes]
    if opts.fallback:
        candidates += b.fallback(candidates)

    fp32 = next((c for c in candidates if c.recipe.name == "fp32"), None)
    b.fp32_latency = fp32.latency_ms if fp32 else None
    picked = select(
        [Scored(c.recipe.name, c.passed, c.compressed_estimate, c.latency_best_ms,
                c.fidelity.value if c.fidelity else 0.0) for c in candidates],
        fp32.latency_best_ms if fp32 else None,
    )
    fell_back = False
    if picked is not None:
        chosen = next(c for c in candidates if c.recipe.name == picked.name)
        fell_back = chosen.recipe.name == "fp32" and not any(c.passed for c in candidates if c.recipe.name != "fp32")
    else:
        if fp32 is None or fp32.path is None:
            reasons = "; ".join(f"{c.recipe.name}: {c.reason}" for c in candidates)
            raise GateError(f"no variant for profile {profile.id} passes the gate and it cannot run fp32 ({reasons})")
        if fp32.size_bytes > profile.max_artifact_bytes:
            raise ModelError(
                f"model is {fp32.size_bytes} bytes; profile {profile.id} holds at most {profile.max_artifact_bytes} "
                "and no smaller variant passes the gate"
            )
        chosen, fell_back = fp32, True
    assert chosen.path is not None

    data = chosen.path.read_bytes()
    choice = codec.choose_codec(data)
    ota = codec.ota_size(choice.compressed_size, profile.chunk_size)
    runner = open_runner(chosen.path, source.format)
    golden: tuple[GoldenCase, ...] = ()
    probe = runner.inputs
    if b.unchecked is None:
        feed = sample_feed(runner, b.evaluation)
        golden = _golden(runner, feed, chosen.recipe.precision)
        # the agent's warm-up probe takes these shapes: a real sample's, so open dims get sizes the model accepts
        probe = tuple(TensorSpec(s.name, s.dtype, tuple(feed[s.name].shape)) if s.name in feed else s
                      for s in runner.inputs)
    health = HealthSpec(
        inputs=probe,
        outputs=runner.outputs,
        latency_budget_ms=profile.latency_budget_ms,
        golden=golden,
    )
    min_version = _min_runtime_version(source.format, chosen)
    if version_tuple(min_version) > b.rt.version_tuple:
        raise UnsupportedOpError(
            f"{chosen.recipe.name} needs {b.runtime_name} >= {min_version}; profile {profile.id} has {b.rt.version}",
            profile=profile.id,
        )
    runtime = RuntimeSpec(
        format=source.format,
        runtime=b.runtime_name,
        min_version=min_version,
        execution_providers=b.rt.execution_providers if source.format == "onnx" else (),
        extra={"precision": chosen.recipe.precision, **({"opset": chosen.opset} if chosen.opset else {})},
    )
    quantizer = (
        f"onnxruntime.quantization {_version('onnxruntime')}" if source.format == "onnx"
        else litert_tools.quantizer_version() or "none"
    )
    runtime_dist = "onnxruntime" if source.format == "onnx" else "ai-edge-litert"
    provenance: dict[str, Any] = {
        "recipe": chosen.recipe.to_dict(),
        "fell_back_to_fp32": fell_back,
        "quantizer": quantizer if chosen.recipe.kind not in ("fp32", "prune") else None,
        "toolchain": {
            "onnx": _version("onnx"),
            "onnxruntime": _version("onnxruntime"),
            "ai-edge-litert": _version("ai-edge-litert"),
            "litert-quantizer": litert_tools.quantizer_version(),
            "numpy": np.__version__,
        },
        "validated_with": f"{b.runtime_name} {_version(runtime_dist)}",
        "min_runtime_version": min_version,
        "opset": chosen.opset,
        "fidelity": chosen.fidelity.to_dict() if chosen.fidelity else None,
        "gate": gate.to_dict(),
        "size_bytes": chosen.size_bytes,
        "source_size_bytes": source.size,
        "compression": choice.compression,
        "compressed_size_bytes": choice.compressed_size,
        "lzma_size_bytes": choice.lzma_size,
        "zlib_size_bytes": choice.zlib_size,
        "compressed_size_estimated": choice.estimated,
        "ota_size_bytes": ota,
        "latency_ms": chosen.latency_ms,
        "fp32_latency_ms": b.fp32_latency,
        "latency_note": b.latency_note,
        "source_sha256": source.sha256,
        "variant_sha256": chosen.sha256,
        "datasets": {
            "evaluation_sha256": evaluation.sha256,
            "evaluation_samples": b.evaluation.samples,
            "calibration_sha256": calibration.sha256 if calibration else None,
            "calibration_samples": b.calibration.samples if b.calibration else 0,
        },
        "notes": b.notes,
        "candidates": [c.to_dict() for c in candidates],
        "built_at": time.time(),
    }
    return ProfileResult(profile.id, chosen, fell_back, tuple(candidates), choice.compression, ota, runtime, health,
                         provenance)


def _min_runtime_version(fmt: str, chosen: Candidate) -> str:
    if fmt == "onnx":
        by_opset = onnx_tools.min_ort_version(chosen.opset or 13)
        needed = str(chosen.recipe.params.get("min_ort", "0"))
        return max(by_opset, needed, key=version_tuple)
    if chosen.recipe.kind == "fp32":
        return "1.2"
    # Quantized flatbuffers use op versions of the LiteRT release they were validated with.
    return ".".join(_version("ai-edge-litert").split(".")[:2])
