"""LiteRT graph rewrites that let XNNPACK delegate a full-int8 model, and a report of what it delegates.

XNNPACK (LiteRT 2.3's delegate) runs int8 CONV_2D, DEPTHWISE_CONV_2D, ADD, PAD, MAX_POOL_2D, RESHAPE,
CONCATENATION, QUANTIZE and DEQUANTIZE, but not a standalone int8 RELU: in LiteRT Quantizer's full-int8
face_det every RELU (17 of 97 ops) stayed on the builtin kernels and split the graph into 18 XNNPACK
partitions, each entered and left through the interpreter (6x fp32's latency). A RELU that follows an
op with a fused-activation field is the same computation as that op with the activation fused: the
float graph is rewritten that way before quantizing (``fuse_activations``), so the quantizer calibrates
and quantizes the fused op and nothing is left for the builtin kernels.

``delegation`` says which ops of a model XNNPACK takes: the interpreter lists every op of the source
graph and then one DELEGATE node per partition; a partition holds the ops between its inputs and outputs.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.compression.litert_tools import _drop_unused_tensors, fix_operator_codes

#: Standalone activation op -> the ActivationFunctionType that fuses it (same computation).
FUSABLE_ACTIVATIONS = {"RELU": "RELU", "RELU6": "RELU6", "RELU_N1_TO_1": "RELU_N1_TO_1"}
#: Ops whose builtin options carry ``fusedActivationFunction``.
FUSING_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "SUB", "MUL", "CONCATENATION",
              "AVERAGE_POOL_2D", "MAX_POOL_2D", "TRANSPOSE_CONV")


def fuse_activations(src: Path, dst: Path) -> int:
    """Write ``src`` with each standalone RELU/RELU6/RELU_N1_TO_1 fused into the op that produces its input.

    Fused only where that op has no activation yet, its output feeds the activation alone and is no graph
    or signature output: then the fused op's output takes the activation's output tensor (name, shape,
    quantization) and the activation op goes. Returns how many were fused.
    """
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    model: Any = flatbuffer_utils.read_model_from_bytearray(bytearray(src.read_bytes()))
    fix_operator_codes(model)
    names = {getattr(schema.BuiltinOperator, n): n for n in [*FUSABLE_ACTIVATIONS, *FUSING_OPS]}
    fused = 0
    for index, graph in enumerate(model.subgraphs):
        outputs = {int(i) for i in graph.outputs}
        for sig in model.signatureDefs or []:
            if sig.subgraphIndex == index:
                outputs |= {m.tensorIndex for m in sig.outputs}
        consumers: collections.Counter[int] = collections.Counter(
            int(i) for o in graph.operators for i in o.inputs if i >= 0)
        producer = {int(t): o for o in graph.operators for t in o.outputs}
        dropped: set[int] = set()
        for op in graph.operators:
            name = names.get(flatbuffer_utils.get_builtin_code_from_operator_code(
                model.operatorCodes[op.opcodeIndex]))
            if name not in FUSABLE_ACTIVATIONS or len(op.inputs) != 1 or len(op.outputs) != 1:
                continue
            inner = int(op.inputs[0])
            prev = producer.get(inner)
            if prev is None or id(prev) in dropped or len(prev.outputs) != 1 or consumers[inner] != 1 \
                    or inner in outputs:
                continue
            prev_name = names.get(flatbuffer_utils.get_builtin_code_from_operator_code(
                model.operatorCodes[prev.opcodeIndex]))
            options = prev.builtinOptions
            if prev_name not in FUSING_OPS or options is None \
                    or getattr(options, "fusedActivationFunction", None) != schema.ActivationFunctionType.NONE:
                continue
            options.fusedActivationFunction = getattr(schema.ActivationFunctionType, FUSABLE_ACTIVATIONS[name])
            prev.outputs = [int(op.outputs[0])]
            producer[int(op.outputs[0])] = prev
            dropped.add(id(op))
            fused += 1
        graph.operators = [o for o in graph.operators if id(o) not in dropped]
        _drop_unused_tensors(model, index)
    dst.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return fused


@dataclass(frozen=True)
class Delegation:
    """Which ops of a model's primary subgraph XNNPACK runs, by op name."""

    partitions: int
    delegated: collections.Counter[str] = field(default_factory=collections.Counter)
    builtin: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def complete(self) -> bool:
        return not self.builtin

    def describe(self) -> str:
        left = ", ".join(f"{n} x{c}" for n, c in sorted(self.builtin.items())) or "none"
        return (f"{sum(self.delegated.values())} of {sum(self.delegated.values()) + sum(self.builtin.values())}"
                f" ops in {self.partitions} XNNPACK partition(s); builtin kernels: {left}")


def delegation(path: Path) -> Delegation:
    """What XNNPACK (LiteRT's default delegate, 1 thread) takes of ``path``'s primary subgraph."""
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

    interp = Interpreter(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    nodes = interp._get_ops_details()  # the op list with DELEGATE nodes
    ops = [n for n in nodes if n["op_name"] != "DELEGATE"]
    partitions = [n for n in nodes if n["op_name"] == "DELEGATE"]
    producer = {int(t): n for n in ops for t in n["outputs"]}
    inside: set[int] = set()
    for part in partitions:
        stop = {int(t) for t in part["inputs"]}
        todo = [int(t) for t in part["outputs"]]
        while todo:
            t = todo.pop()
            node = producer.get(t)
            if t in stop or node is None or node["index"] in inside:
                continue
            inside.add(node["index"])
            todo.extend(int(i) for i in node["inputs"] if i >= 0)
    result = Delegation(len(partitions))
    for n in ops:
        (result.delegated if n["index"] in inside else result.builtin)[n["op_name"]] += 1
    return result

