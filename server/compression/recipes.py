"""Which recipes a profile gets, from what it allows and what its hardware does well.

* fp32, graph-optimized: whenever the profile allows fp32 (also the fallback when nothing passes).
* fp16 weights (``fp16-weights``): every profile whose runtime takes float (not the Edge TPU):
  weights stored as fp16 and restored to fp32 at load (ONNX: fp16 initializers + Cast, folded by
  ONNX Runtime at session creation; LiteRT: fp16 constants + DEQUANTIZE, as MediaPipe ships them).
  Half the download, fp32 compute. Skipped for a .tflite that already stores fp16 weights.
* fp16 (I/O kept fp32): GPU profiles only; fp16 ONNX on CPUs is slower (Cast nodes; ORT #25824).
* int8 dynamic: models with MatMul/Gemm weights (transformers); per-channel; MatMul, Gemm and
  embedding Gathers; reduce_range (7-bit weights) on x86 without VNNI, where the U8S8 AVX2 kernels
  can saturate.
* int8 weight-only: MatMulNBits with 8-bit blockwise weights (block 128, int8 compute, accuracy
  level 4) plus int8 embeddings; x86 profiles with onnxruntime >= 1.22 (its 8-bit x86 kernel).
* int8 static QDQ: with calibration data; MinMax, Percentile and Entropy calibration; S8S8 on ARM
  and VNNI, U8S8 with reduce_range on x86 without VNNI (ORT "Quantize ONNX models").
* int8 static per-tensor (``int8-static-pertensor``): ONNX Runtime's quantize_static defaults (MinMax,
  per-tensor weights), kept as a candidate so the gate can ship it where it is as faithful and smaller.
* int8 NNCF (``int8-nncf``): ``nncf.quantize`` on the pre-processed model (int8 weights, fast bias
  correction), when NNCF is installed (the ``server`` extra).
* magnitude pruning (fp32 weights, 50 % zeros): shrinks the compressed download only.
* .tflite: int8 weight storage with fp32 compute (``int8-weights``, ``int8-weights-searched``: int8
  constants behind DEQUANTIZE, per-channel or per-tensor scales) on every float profile; LiteRT
  Quantizer ``dynamic_wi8_afp32`` and ``static_wi8_ai8``; an Edge TPU profile gets only the full-int8
  recipe (all it can run).

A fallback (the int8 candidate with the best fidelity, re-quantized with its most divergent nodes
kept in float) is added by the pipeline when no int8 recipe passes the gate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.profiles import DeviceProfile

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
PRUNE_SPARSITY = 0.5
#: MatMulNBits with 8-bit weights has an x86 CPU kernel from onnxruntime 1.22 (onnxruntime PR #24491).
WEIGHT_ONLY_MIN_ORT = (1, 22)


@dataclass(frozen=True)
class Recipe:
    name: str
    precision: str  # fp32 | fp16 | int8: what the variant computes in (fp16-weights, int8-weights: fp32)
    kind: str  # fp32 | fp16w | fp16 | dynamic | static | nbits | prune | litert | int8w
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def fp32_compute(self) -> bool:
        """Runs fp32's kernels at inference (fp32, fp16 weights restored to fp32 at load, pruned fp32; any
        recipe whose params say ``compute: float32``): the selection never sets it aside on latency,
        whatever a busy machine's timing says."""
        return self.precision == "fp32" or self.params.get("compute") == "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "precision": self.precision, "kind": self.kind, "params": dict(self.params),
                "compute": "float32" if self.fp32_compute else self.precision}


#: Float storage: fp16 weights in the file, restored to fp32 at load (ONNX: Cast; LiteRT: DEQUANTIZE).
FP16_WEIGHTS = Recipe("fp16-weights", "fp32", "fp16w", {"storage": "float16", "compute": "float32"})
#: LiteRT int8 weight storage, fp32 compute (server/compression/litert_int8w.py): per-channel scales, and
#: the same with one scale per tensor wherever the gate's metric affords it on the calibration split.
INT8_WEIGHTS = Recipe("int8-weights", "fp32", "int8w",
                      {"storage": "int8", "compute": "float32", "granularity": "per-channel"})
INT8_WEIGHTS_SEARCHED = Recipe("int8-weights-searched", "fp32", "int8w",
                               {"storage": "int8", "compute": "float32", "granularity": "searched"})


def int8_flavour(profile: DeviceProfile) -> dict[str, bool]:
    """U8S8 on x86 (VNNI or not), S8S8 elsewhere; reduce_range on x86 without VNNI.

    ONNX Runtime's x86 kernels are U8S8: with uint8 activations every QDQ group fuses into QLinearConv,
    QLinearAdd, QLinearMul, QLinearGlobalAveragePool, QLinearConcat; with int8 activations the x86 CPU EP
    fuses only part of the convolutions (NHWC, with Transposes around them) and leaves the rest as
    DequantizeLinear -> float op -> QuantizeLinear (PP-OCRv4 det: 48 of 62 convs fused, 442 DQ and 244 Q
    nodes left, 1.3x fp32's time; uint8: all 62 fused, 42 DQ, 0.47x)."""
    x86 = profile.arch in ("x86_64", "amd64")
    return {"signed_activations": not x86, "reduce_range": x86 and not profile.has_vnni}


def plan(
    profile: DeviceProfile,
    fmt: str,
    *,
    ops: frozenset[str],
    has_calibration: bool,
    methods: tuple[str, ...] = CALIBRATION_METHODS,
    pruning: bool = True,
    nncf: bool = False,
) -> list[Recipe]:
    allowed = profile.allowed_precisions
    out: list[Recipe] = []
    float_storage = "fp32" in allowed and profile.accelerator != "edgetpu"
    if fmt == "tflite":
        if "fp32" in allowed:
            out.append(Recipe("fp32", "fp32", "fp32"))
        if float_storage:
            out.append(FP16_WEIGHTS)
            out.append(INT8_WEIGHTS)
            if has_calibration:
                out.append(INT8_WEIGHTS_SEARCHED)
        if "int8" in allowed:
            if profile.accelerator != "edgetpu":
                out.append(Recipe("litert-dynamic-wi8", "int8", "litert", {"recipe": "dynamic_wi8_afp32"}))
            if has_calibration:  # float I/O wrapped around it, but on the Edge TPU (int8 end to end)
                params = {"recipe": "static_wi8_ai8", "float_io": profile.accelerator != "edgetpu"}
                out.append(Recipe("litert-static-wi8-ai8", "int8", "litert", params))
        return out
    if "fp32" in allowed:
        out.append(Recipe("fp32", "fp32", "fp32"))
    if float_storage:
        out.append(FP16_WEIGHTS)
    if "fp16" in allowed and profile.gpu:
        out.append(Recipe("fp16", "fp16", "fp16", {"keep_io_types": True}))
    if "int8" in allowed:
        flavour = int8_flavour(profile)
        if ops & {"MatMul", "Gemm"}:
            out.append(
                Recipe(
                    "int8-dynamic",
                    "int8",
                    "dynamic",
                    {"per_channel": True, "reduce_range": flavour["reduce_range"],
                     "op_types": ["MatMul", "Gemm", "Gather"]},
                )
            )
        ort = profile.runtime("onnxruntime")
        x86 = profile.arch in ("x86_64", "amd64")
        if "MatMul" in ops and x86 and ort is not None and ort.version_tuple >= WEIGHT_ONLY_MIN_ORT:
            out.append(
                Recipe(
                    "int8-weight-only",
                    "int8",
                    "nbits",
                    {"bits": 8, "block_size": 128, "accuracy_level": 4, "embeddings": "int8",
                     "min_ort": ".".join(map(str, WEIGHT_ONLY_MIN_ORT))},
                )
            )
        if has_calibration:
            act = "S8S8" if flavour["signed_activations"] else "U8S8"
            for method in methods:
                out.append(
                    Recipe(
                        f"int8-static-{method}",
                        "int8",
                        "static",
                        {"method": method, "format": "QDQ", "types": act, "per_channel": True, **flavour},
                    )
                )
            # what ORT's quantize_static does by default (per-tensor weights, MinMax): smaller scales, and
            # on some CNNs as faithful; and NNCF's (fast bias correction, its own placement of QDQ pairs)
            out.append(Recipe("int8-static-pertensor", "int8", "static",
                              {"method": "minmax", "format": "QDQ", "types": act, "per_channel": False, **flavour}))
            if nncf:
                out.append(Recipe("int8-nncf", "int8", "nncf", {"preset": "performance", "fast_bias_correction": True}))
    if pruning and "fp32" in allowed:
        out.append(Recipe("fp32-pruned50", "fp32", "prune", {"sparsity": PRUNE_SPARSITY}))
    return out
