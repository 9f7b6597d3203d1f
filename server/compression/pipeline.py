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
import shutil
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.files import file_sha256
from agent.protocol.messages import GoldenCase, HealthSpec, RuntimeSpec, TensorData, TensorSpec
from server.compression import (
    codec,
    delta_quant,
    litert_int8,
    litert_int8w,
    litert_tools,
    nncf_tools,
    onnx_tools,
    retime,
)
from server.compression.data import Dataset
from server.compression.gate import (
    SIZE_SLACK,
    Fidelity,
    GateSpec,
    Scored,
    cannot_win,
    check_fidelity,
    measure_fidelity,
    select,
    shortfall,
)
from server.compression.host import stand_in
from server.compression.recipes import CALIBRATION_METHODS, Recipe, plan
from server.compression.runners import LiteRtRunner, Runner, latency_ms, open_runner, run_dataset, sample_feed
from server.compression.share import BuildShare, Measured, Prepared, digest
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
    #: Static int8: the first calibration method is made first; the others are skipped when it misses the
    #: gate by more than this (in the metric's units), more than other methods moved it on the models
    #: measured. None: every method always runs.
    method_skip_gap: float | None = 0.02
    #: The fallback is not tried when the best failing int8 candidate misses the gate by more than this:
    #: its rounds recovered 0.031 on PP-OCRv4 det (IoU 0.944 -> 0.975) and 0.020 on PP-OCRv4 rec (per-step
    #: top-1 0.905 -> 0.925, still failing, 70 s of a 10-minute build). None: always tried.
    fallback_max_gap: float | None = 0.05
    previous: Path | None = None  # the previous version's build for this profile: reuse its int8 scales (deltas)
    #: The evaluation data is synthetic: when the model does not run on it, ship fp32 unchecked rather than nothing.
    synthetic: bool = False
    #: how selection trades size against latency (``gate.OPTIMIZE_CHOICES``)
    optimize: str = "balanced"
    #: per candidate name, the latency the profile's own devices measured (median p50, ``server.measured``)
    measured: Mapping[str, float] = field(default_factory=dict)
    #: a probe's evidence (``server.probe.ProbeOutcome.evidence``): kept in the provenance, marks the build measured
    probe: Mapping[str, Any] | None = None


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
        return self.status == "passed"  # status: passed | failed | error | skipped (never made)

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


# -- helpers ------------------------------------------------------------------------------------------


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
        return SourceModel(path, "tflite", ins, outs, None, frozenset(), file_sha256(path), path.stat().st_size)
    model = onnx_tools.load(path)
    ins, outs = onnx_tools.io_specs(model)
    if not ins:
        raise ModelError(f"{path.name} has no inputs")
    return SourceModel(
        path, "onnx", ins, outs, onnx_tools.opset(model), frozenset(onnx_tools.op_types(model)), file_sha256(path),
        path.stat().st_size,
    )


def _runs_without_xnnpack(path: Path, data: Dataset) -> str | None:
    """None when the .tflite file loads and runs one sample on the builtin kernels; else the error."""
    try:
        runner = LiteRtRunner(path, xnnpack=False)
        runner.run(sample_feed(runner, data))
    except ModelError as exc:
        return exc.message[:300]
    return None


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


def _io_types_changed(source: Path, variant: Path) -> str:
    """'' when the .tflite variant takes and returns the source's dtypes, else which tensors differ
    (LiteRT Quantizer's full-int8 recipe makes int8 inputs and outputs)."""
    before, after = litert_tools.io_specs(source), litert_tools.io_specs(variant)
    return ", ".join(f"{a.name} {a.dtype} -> {b.dtype}" for side in (0, 1)
                     for a, b in zip(before[side], after[side], strict=False) if a.dtype != b.dtype)


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
        share: BuildShare,
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
        self.share = share
        self.prep_key = ""  # which prepared (opset-fitted, pre-processed) model the candidates come from
        self.builtin_ok: bool | None = None  # whether the .tflite source runs without XNNPACK (checked once)
        self.unchecked: str | None = None  # why fp32 could not be run here (synthetic inputs the model refuses)
        self.produce_notes: list[str] = []  # what making the current candidate noted (kept with its measurement)
        self.passing: list[Scored] = []  # the candidates that passed so far, as selection sees them
        self.fp32_best: float | None = None  # fp32's best latency here (what selection compares)

    # ---- setup

    def _reference_key(self) -> str:
        ev = self.evaluation
        return digest("reference", self.source.sha256, ev.sha256 or None, ev.samples, ev.layout,
                      _version("onnxruntime") if self.source.format == "onnx" else _version("ai-edge-litert"))

    def prepare(self) -> None:
        if self.gate.metric == "accuracy" and self.evaluation.labels is None:
            raise DatasetError("the accuracy metric needs a 'labels' array in the evaluation data")
        key = self._reference_key()
        cached = self.share.reference(key) if self.evaluation.sha256 else None
        if cached is None:
            self.progress("reference outputs (fp32)")
            ref_runner = open_runner(self.source.path, self.source.format)
            try:
                cached = run_dataset(ref_runner, self.evaluation)
            except ModelError as exc:
                if not self.options.synthetic:
                    raise
                # The synthetic values (not the shapes: those follow the model) can be out of the model's
                # domain, e.g. a sample rate it checks. The model itself loaded: it still gets its fp32 build.
                cached = f"fp32 not run: the model refused synthetic inputs ({exc.message[:200]})"
            self.share.put_reference(key, cached, persist=bool(self.evaluation.sha256))
        else:
            self.progress("reference outputs (fp32, cached)")
        if isinstance(cached, str):
            self.unchecked = cached
            self.notes.append(cached)
        else:
            self.reference = cached
        if self.source.format == "onnx":
            assert self.rt.max_opset is not None
            model = onnx_tools.fit_opset(onnx_tools.load(self.source.path), self.rt.max_opset, self.profile.id,
                                         self.runtime_name)
            converted = onnx_tools.opset(model) != self.source.opset
            # the same fitted model (and the same quantizer input) serves every profile with the same outcome
            self.prep_key = digest("prepared", self.source.sha256, onnx_tools.opset(model),
                                   self.rt.max_opset >= onnx_tools.PER_CHANNEL_OPSET)
            prepared = self.share.prepared.get(self.prep_key)
            if prepared is None:
                folder = self.share.folder(self.prep_key)
                notes = [f"opset converted {self.source.opset} -> {onnx_tools.opset(model)}"] if converted else []
                base, pre = folder / "base.onnx", folder / "pre.onnx"
                onnx_tools.save(model, base)
                self.progress("pre-processing")
                notes.extend(onnx_tools.preprocess(base, pre))
                notes.extend(onnx_tools.raise_opset_for_quantization(pre, self.rt.max_opset))
                prepared = self.share.prepared[self.prep_key] = Prepared(base, pre, notes)
            self.base, self.pre = prepared.base, prepared.pre
            self.notes.extend(prepared.notes)

    def check_builtin_kernels(self, path: Path) -> None:
        """A .tflite candidate must also run on LiteRT's builtin kernels (no XNNPACK) when the source does.

        XNNPACK takes what it can and leaves the rest to the builtin kernels, which are stricter (int8
        conv weights must be symmetric); a device without XNNPACK runs everything on them.
        """
        if self.builtin_ok is None:
            self.builtin_ok = _runs_without_xnnpack(self.source.path, self.evaluation) is None
        if self.builtin_ok:
            error = _runs_without_xnnpack(path, self.evaluation)
            if error is not None:
                raise ModelError(f"LiteRT without XNNPACK refuses it: {error}")

    # ---- candidates

    def _optimized(self, out: Path) -> Path:
        """ORT's basic graph optimizations of the fitted model, unless they grow the file (constant folding
        inside If bodies can): then the fitted model as it is."""
        onnx_tools.optimize_fp32(self.base, out)
        if out.stat().st_size > self.base.stat().st_size:
            shutil.copyfile(self.base, out)
            self.produce_notes.append("graph optimization grew the model: fp32 kept unoptimized")
        return out

    def produce(self, recipe: Recipe, folder: Path, exclude: Sequence[str] = ()) -> Path:
        ext = ".onnx" if self.source.format == "onnx" else ".tflite"
        out = folder / f"{recipe.name}{ext}"
        p = recipe.params
        if recipe.kind == "fp32":
            if self.source.format == "onnx":
                self._optimized(out)
            else:
                shutil.copyfile(self.source.path, out)
        elif recipe.kind == "fp16":
            onnx_tools.to_fp16(self.pre, out)
        elif recipe.kind == "fp16w":
            if self.source.format == "onnx":
                optimized = self._optimized(folder / f"{recipe.name}.fp32.onnx")
                converted = onnx_tools.fp16_weights(optimized, out)
            else:
                converted = litert_tools.fp16_weights(self.source.path, out)
            if not converted:
                raise ModelError("no float weights to store as fp16")
        elif recipe.kind == "dynamic":
            onnx_tools.quantize_dynamic(self.pre, out, per_channel=p["per_channel"], reduce_range=p["reduce_range"],
                                        op_types=p.get("op_types"), exclude=exclude)
        elif recipe.kind == "static":
            assert self.calibration is not None
            first = self.source.inputs[0].shape
            batch = first[0] if first and first[0] > 0 else 1
            ranges = digest("calibration", self.prep_key, self.calibration.sha256, self.calibration.samples,
                            p["method"])
            onnx_tools.quantize_static(self.pre, out, self.calibration, method=p["method"],
                                       signed_activations=p["signed_activations"], reduce_range=p["reduce_range"],
                                       per_channel=p["per_channel"], batch=batch, exclude=exclude,
                                       cache=self.share.dir / f"ranges-{ranges[:24]}.json")
        elif recipe.kind == "nncf":
            assert self.calibration is not None
            first = self.source.inputs[0].shape
            nncf_tools.quantize(self.pre, out, self.calibration, batch=first[0] if first and first[0] > 0 else 1,
                                exclude=exclude)
        elif recipe.kind == "nbits":
            onnx_tools.quantize_weight_only(self.pre, out, block_size=p["block_size"],
                                            accuracy_level=p["accuracy_level"], exclude=exclude)
        elif recipe.kind == "prune":
            onnx_tools.prune(self.base, out, p["sparsity"])
        elif recipe.kind == "litert":
            if p["recipe"] == "static_wi8_ai8" and self.calibration is not None:  # server/compression/litert_int8.py
                float_io = bool(p.get("float_io"))  # the Edge TPU runs int8 end to end: no float tail there
                litert_int8.static_int8(self.source.path, out, self.calibration, float_io=float_io,
                                        gate=self.gate if float_io else None)
            elif p.get("float_io"):
                quantized = folder / f"{recipe.name}.int8-io.tflite"
                litert_tools.quantize(self.source.path, quantized, p["recipe"], self.calibration)
                litert_tools.float_io(quantized, out)
            else:
                litert_tools.quantize(self.source.path, out, p["recipe"], self.calibration)
        elif recipe.kind == "int8w":
            if p["granularity"] == "searched":
                assert self.calibration is not None
                plans = litert_int8w.search(self.source.path, out, self.calibration, self.gate)
            else:  # biases corrected for the weights' rounding when there is data to measure activations on
                means = litert_int8w.activation_means(self.source.path, self.calibration) if self.calibration else None
                plans = litert_int8w.int8_weights(self.source.path, out, means=means)
            if not any(plan.granularity != "kept" for plan in plans):
                raise ModelError("no conv/FC weights to store as int8")
        else:  # pragma: no cover - plan() only makes the kinds above
            raise ModelError(f"unknown recipe kind {recipe.kind}")
        return out

    def _candidate_key(self, recipe: Recipe, exclude: Sequence[str]) -> str:
        ev, cal = self.evaluation, self.calibration
        return digest("candidate", self.source.sha256, self.prep_key, recipe.kind,
                      recipe.params, sorted(exclude), self.gate.to_dict(), ev.sha256, ev.samples,
                      cal.sha256 if cal else None, cal.samples if cal else 0, self.unchecked is None)

    def measure(self, recipe: Recipe, exclude: Sequence[str] = ()) -> Measured:
        """Make the candidate, or take what an earlier profile of this build made (and maybe measured)."""
        key = self._candidate_key(recipe, exclude)
        m = self.share.measured.get(key)
        if m is None:
            m = self.share.measured[key] = self._make(recipe, exclude, self.share.folder(key))
        else:
            self.share.hits += 1
        return m

    def run(self, m: Measured, recipe: Recipe) -> None:
        """Run the made candidate on the evaluation data (once per build) and, where this machine stands in
        for the profile, time it (once per build)."""
        if not m.evaluated and m.error is None and m.path is not None:
            self._evaluate_made(m, recipe)
        if self.measure_latency and m.latency is None and m.error is None and m.path is not None \
                and self.unchecked is None:
            runner = open_runner(m.path, self.source.format)
            m.latency, m.best = latency_ms(runner, sample_feed(runner, self.evaluation), runs=self.options.latency_runs)

    def _same_key(self, sha: str) -> str:
        return digest("file", sha, self.evaluation.sha256, self.evaluation.samples, self.gate.to_dict(),
                      self.unchecked is None)

    def _make(self, recipe: Recipe, exclude: Sequence[str], folder: Path) -> Measured:
        t0 = time.monotonic()
        self.produce_notes = []
        try:
            path = self.produce(recipe, folder, exclude)
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            same = self.share.by_sha.get(self._same_key(sha))
            if same is not None:  # another recipe made the very same file (entropy ranges = minmax ranges)
                self.share.hits += 1
                return replace(same, path=path, latency=None, best=None, build_s=time.monotonic() - t0)
            op_set, ops = None, frozenset[tuple[str, str]]()
            if self.source.format == "onnx":
                model = onnx_tools.load(path)
                op_set, ops = onnx_tools.opset(model), onnx_tools.domain_ops(model)
                del model
        except ServerError as exc:
            return Measured(error=exc.message[:300], build_s=time.monotonic() - t0, evaluated=True)
        except Exception as exc:  # quantizers raise anything; one broken recipe must not stop the others
            log.info("recipe %s failed", recipe.name, exc_info=True)
            return Measured(error=f"{type(exc).__name__}: {str(exc)[:300]}", build_s=time.monotonic() - t0,
                            evaluated=True)
        return Measured(path=path, size=len(data), estimate=len(zlib.compress(data, 1)), sha256=sha,
                        opset=op_set, ops=ops, build_s=time.monotonic() - t0, notes=tuple(self.produce_notes))

    def _evaluate_made(self, m: Measured, recipe: Recipe) -> None:
        assert m.path is not None
        t0 = time.monotonic()
        try:
            runner = open_runner(m.path, self.source.format)
            if self.source.format == "tflite" and recipe.kind != "fp32":
                self.check_builtin_kernels(m.path)
            if self.unchecked is None:
                outputs = run_dataset(runner, self.evaluation)
                m.fidelity = measure_fidelity(self.reference, outputs, self.gate, self.evaluation.labels)
        except ServerError as exc:
            m.error = exc.message[:300]
        except Exception as exc:
            log.info("recipe %s failed to run", recipe.name, exc_info=True)
            m.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        m.evaluated = True
        m.build_s += time.monotonic() - t0
        if m.error is None:
            self.share.by_sha[self._same_key(m.sha256)] = m

    def evaluate(self, recipe: Recipe, exclude: Sequence[str] = ()) -> Candidate:
        """The shared measurement, judged by this profile: opset and ops, the gate, size and latency limits."""
        self.progress(recipe.name)
        m = self.measure(recipe, exclude)
        self.notes.extend(n for n in m.notes if n not in self.notes)  # the same notes on every profile sharing it
        if m.error is not None or m.path is None:
            return Candidate(recipe, "error", m.error, build_s=m.build_s)
        if self.source.format == "onnx":
            assert self.rt.max_opset is not None
            if m.opset is not None and m.opset > self.rt.max_opset:
                return Candidate(recipe, "error", f"opset {m.opset} > {self.rt.max_opset} ({self.profile.id})",
                                 opset=m.opset, build_s=m.build_s)
            try:
                onnx_tools.check_op_types(m.ops, self.rt.max_opset, self.profile.id, self.runtime_name)
            except ServerError as exc:
                return Candidate(recipe, "error", exc.message[:300], build_s=m.build_s)
        if not m.evaluated and recipe.kind != "fp32":
            winner = cannot_win(m.estimate, self.passing, self.fp32_best, optimize=self.options.optimize,
                                measured=self.options.measured)
            if winner is not None:
                return Candidate(recipe, "skipped", f"skipped: cannot be chosen: {m.estimate} bytes compressed, more "
                                 f"than {SIZE_SLACK}x {winner.name} ({winner.ota_size} bytes), which passed and "
                                 f"is not slower than fp32 (optimize {self.options.optimize}, no device "
                                 f"measurements): not run on the evaluation data",
                                 path=m.path, size_bytes=m.size, compressed_estimate=m.estimate, opset=m.opset,
                                 sha256=m.sha256, build_s=m.build_s)
        self.run(m, recipe)
        if m.error is not None:
            return Candidate(recipe, "error", m.error, build_s=m.build_s)
        cand = self._judge(recipe, m)
        if cand.passed:
            self.passing.append(Scored(recipe.name, True, cand.compressed_estimate, cand.latency_best_ms,
                                       cand.fidelity.value if cand.fidelity else 0.0, recipe.fp32_compute))
        if recipe.kind == "fp32":
            self.fp32_best = cand.latency_best_ms
        return cand

    def _judge(self, recipe: Recipe, m: Measured) -> Candidate:
        """The gate's verdict and this profile's size and latency limits on a measured candidate."""
        assert m.path is not None
        fid, size, estimate, latency = m.fidelity, m.size, m.estimate, m.latency
        reason = check_fidelity(fid, self.gate) if fid is not None else None
        if fid is None and recipe.kind != "fp32":
            reason = self.unchecked or "not evaluated"
        if recipe.kind == "fp32":
            self.fp32_size, self.fp32_estimate = size, estimate
        elif reason is None and size > self.source.size:
            reason = f"larger than the source ({size} vs {self.source.size} bytes): not a candidate"
        elif reason is None and self.fp32_size and recipe.kind != "prune" and size >= 0.95 * self.fp32_size:
            reason = f"not smaller than fp32 ({size} vs {self.fp32_size} bytes): nothing was quantized"
        elif reason is None and self.fp32_estimate and recipe.kind == "prune" and estimate >= 0.95 * self.fp32_estimate:
            reason = "compresses no better than fp32"
        if reason is None and size > self.profile.max_artifact_bytes:
            reason = f"{size} bytes > the profile's max artifact size {self.profile.max_artifact_bytes}"
        if reason is None and self.source.format == "tflite" and self.profile.accelerator != "edgetpu":
            changed = _io_types_changed(self.source.path, m.path)
            if changed:
                reason = f"changes the model's I/O types ({changed}): clients of this profile send the source's types"
        measured_here = latency if self.measure_latency else None
        if reason is None and measured_here is not None and measured_here > self.profile.latency_budget_ms:
            reason = f"latency {measured_here:.2f} ms > budget {self.profile.latency_budget_ms} ms"
        return Candidate(recipe, "passed" if reason is None else "failed", reason, m.path, fid, size, estimate,
                         measured_here, m.opset, m.sha256, m.build_s, m.best if self.measure_latency else None)

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
        assert best.path is not None and best.fidelity is not None
        gap = shortfall(best.fidelity, self.gate)
        if self.options.fallback_max_gap is not None and gap > self.options.fallback_max_gap:
            self.notes.append(f"fallback skipped: the best int8 candidate ({best.recipe.name}) is {gap:.3f} below "
                              f"the gate, more than keeping nodes in float recovered on the models measured "
                              f"(<= {self.options.fallback_max_gap})")
            return []
        winner = cannot_win(best.compressed_estimate, self.passing, self.fp32_best, optimize=self.options.optimize,
                            measured=self.options.measured)
        if winner is not None:  # float nodes only grow the file
            self.notes.append(f"fallback skipped: {best.recipe.name} with nodes kept in float cannot be chosen: "
                              f"{best.compressed_estimate} bytes compressed already, more than {SIZE_SLACK}x "
                              f"{winner.name} ({winner.ota_size} bytes), which passed")
            return []
        self.progress(f"{best.recipe.name}: finding divergent nodes")
        rank_key = digest("ranking", best.sha256, self.prep_key, best.recipe.kind, best.recipe.params)
        try:
            ranked = self.share.rankings.get(rank_key) or []
            if rank_key not in self.share.rankings and best.recipe.kind == "dynamic":
                bits = 7 if best.recipe.params.get("reduce_range") else 8
                ranked = onnx_tools.matmul_sensitivity(self.pre, self.evaluation, weight_bits=bits)
            elif rank_key not in self.share.rankings:  # static: element-wise, then first layers (front_nodes)
                ranked = onnx_tools.front_nodes(self.pre, best.path)
            self.share.rankings[rank_key] = ranked
        except Exception as exc:
            log.info("divergence analysis failed", exc_info=True)
            self.notes.append(f"fallback skipped: divergence analysis failed ({type(exc).__name__})")
            return []
        out: list[Candidate] = []
        for k in onnx_tools.fallback_cuts(self.pre, ranked, FALLBACK_SHARES):
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
    share: BuildShare | None = None,
) -> ProfileResult:
    """Every recipe the profile allows, gated; the best passing one (else fp32) with provenance.

    ``share``: work kept across the profiles of one build (``server.compression.share``); the
    candidates' files then live in the share's directory, not ``workdir``.
    """
    opts = options or BuildOptions()
    b = _Builder(source, profile, gate, evaluation, calibration, workdir, opts, progress or (lambda _m: None),
                 share or BuildShare(workdir))
    recipes = plan(profile, source.format, ops=source.ops, has_calibration=calibration is not None,
                   methods=opts.methods, pruning=opts.pruning, nncf=nncf_tools.available())
    if opts.only:
        recipes = [r for r in recipes if r.name in opts.only or r.name == "fp32"]
    if source.format == "tflite" and any(r.kind == "fp16w" for r in recipes) \
            and litert_tools.stores_fp16_weights(source.path):
        # the source is already what the recipe makes: its fp32 build is the fp16-weight file
        recipes = [r for r in recipes if r.kind != "fp16w"]
        b.notes.append("fp16-weights skipped: the source already stores its weights as fp16 (its fp32 build is that)")
    if not recipes:
        raise UnsupportedOpError(
            f"profile {profile.id} allows {', '.join(profile.allowed_precisions)}, and no recipe for a "
            f"{source.format} model produces that (calibration data given: {calibration is not None})",
            profile=profile.id,
        )
    b.prepare()
    candidates: list[Candidate] = []
    for r in recipes:
        skip = _method_skip(r, candidates, gate, opts)
        candidates.append(Candidate(r, "skipped", skip) if skip else b.evaluate(r))
    if opts.fallback:
        candidates += b.fallback(candidates)

    fp32 = next((c for c in candidates if c.recipe.name == "fp32"), None)
    if fp32 is not None and b.measure_latency and b.unchecked is None:  # ratios from interleaved timings
        candidates = retime.retime_against_fp32(
            candidates, fp32, open_runner=lambda p: open_runner(p, source.format),
            feed=lambda r: sample_feed(r, b.evaluation), cache=b.share.retimed, notes=b.notes)
    b.fp32_latency = fp32.latency_ms if fp32 else None
    picked = select(
        [Scored(c.recipe.name, c.passed, c.compressed_estimate, c.latency_best_ms,
                c.fidelity.value if c.fidelity else 0.0, c.recipe.fp32_compute) for c in candidates],
        fp32.latency_best_ms if fp32 else None,
        optimize=opts.optimize,
        measured=opts.measured,
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
    chosen = delta_quant.reuse_previous(b, chosen, opts.previous)

    data = chosen.path.read_bytes()
    choice = b.share.codec_choice(data)
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
        "selection": {"optimize": opts.optimize, "measured_latency_ms": dict(opts.measured) or None,
                      "measured": bool(opts.measured), "probe": dict(opts.probe) if opts.probe else None},
        "built_at": time.time(),
    }
    return ProfileResult(profile.id, chosen, fell_back, tuple(candidates), choice.compression, ota, runtime, health,
                         provenance)


def _method_skip(recipe: Recipe, done: Sequence[Candidate], gate: GateSpec, opts: BuildOptions) -> str | None:
    """Why a static int8 candidate need not be made: the per-channel one with the first calibration method,
    same flavour, missed the gate by more than ``opts.method_skip_gap``. Calibration is most of a CNN's
    build time; the methods moved fidelity by at most 0.022 on PP-OCRv4 det (MinMax 0.944, Percentile
    0.922, Entropy 0.944 IoU), and per-tensor weights were never closer (det 0.63-0.87, rec 0.50-0.54
    against 0.944 and 0.905-0.919 per-channel; on digits both pass)."""
    if opts.method_skip_gap is None or recipe.kind != "static" or recipe.params.get("float_nodes"):
        return None
    first = opts.methods[0] if opts.methods else None
    if recipe.params.get("method") == first and recipe.params.get("per_channel"):
        return None

    def flavour(r: Recipe) -> dict[str, Any]:
        return {k: v for k, v in r.params.items() if k not in ("method", "per_channel")}

    ref = next((c for c in done if c.recipe.kind == "static" and c.recipe.params.get("method") == first
                and c.recipe.params.get("per_channel") and flavour(c.recipe) == flavour(recipe)), None)
    if ref is None or ref.fidelity is None:
        return None
    gap = shortfall(ref.fidelity, gate)
    if gap <= opts.method_skip_gap:
        return None
    return (f"skipped: {ref.recipe.name} is {gap:.3f} below the gate ({gate.metric} {ref.fidelity.value:.4f}), "
            f"more than another calibration method or per-tensor weights moved it (<= {opts.method_skip_gap})")


def _min_runtime_version(fmt: str, chosen: Candidate) -> str:
    if fmt == "onnx":
        by_opset = onnx_tools.min_ort_version(chosen.opset or 13)
        needed = str(chosen.recipe.params.get("min_ort", "0"))
        return max(by_opset, needed, key=version_tuple)
    if chosen.recipe.kind == "fp32":
        return "1.2"
    # Quantized flatbuffers use op versions of the LiteRT release they were validated with.
    return ".".join(_version("ai-edge-litert").split(".")[:2])
