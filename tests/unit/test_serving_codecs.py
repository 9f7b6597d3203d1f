"""Pure serving helpers: tensor conversion, golden comparison, the OIP codec, provider selection, configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ConfigError, InvalidInputError
from agent.protocol.messages import TensorData, TensorSpec
from agent.runtime.http import HttpConfig
from agent.runtime.inference import InferenceOptions, version_at_least
from agent.runtime.inference.onnxrt import provider_options, select_providers
from agent.runtime.oip import check_request_fits, encode_infer_response, parse_infer_request
from agent.runtime.tensors import (
    array_from_tensor,
    compare_golden,
    probe_array,
    shape_fits,
    shapes_compatible,
    tensor_from_array,
)

# -- tensors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int8", "uint8", "int32", "int64", "bool"])
def test_tensor_data_round_trip(dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
    tensor = tensor_from_array(array)
    assert tensor.shape == (2, 3, 4) and tensor.dtype == dtype
    back = array_from_tensor(tensor)
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_tensor_data_is_little_endian_on_the_wire() -> None:
    tensor = tensor_from_array(np.array([1], dtype=">i4"))
    assert tensor.data == b"\x01\x00\x00\x00"


def test_tensor_data_with_wrong_byte_count_is_refused() -> None:
    with pytest.raises(ValueError, match="needs 16 bytes"):
        array_from_tensor(TensorData("float32", (2, 2), b"\x00" * 15))


def test_shapes() -> None:
    assert shape_fits((3, 64), (-1, 64))
    assert not shape_fits((3, 63), (-1, 64))
    assert not shape_fits((64,), (-1, 64))
    assert shapes_compatible((-1, 64), (1, -1))
    assert not shapes_compatible((2, 64), (1, 64))


def test_probe_arrays_are_deterministic_and_finite() -> None:
    spec = TensorSpec("x", "float32", (-1, 3, 4))
    a, b = probe_array(spec), probe_array(spec)
    assert a.shape == (1, 3, 4) and a.dtype == np.float32
    assert np.array_equal(a, b) and np.isfinite(a).all() and (a >= 0).all() and (a < 1).all()
    assert probe_array(TensorSpec("ids", "int64", (1, 8))).tolist() == [[1] * 8]


def test_golden_comparison_uses_atol_and_rtol() -> None:
    expected = {"y": np.array([1.0, 100.0], np.float32)}
    ok, worst = compare_golden({"y": np.array([1.0005, 100.5], np.float32)}, expected, atol=1e-3, rtol=1e-2)
    assert ok is None and worst == pytest.approx(0.5)
    bad, _ = compare_golden({"y": np.array([1.1, 100.0], np.float32)}, expected, atol=1e-3, rtol=1e-2)
    assert bad is not None and bad.bad_elements == 1 and "1 of 2" in bad.reason
    nan, _ = compare_golden({"y": np.array([np.nan, 100.0], np.float32)}, expected, atol=1.0, rtol=1.0)
    assert nan is not None
    missing, _ = compare_golden({}, expected, atol=1, rtol=1)
    assert missing is not None and "missing" in missing.reason
    shape, _ = compare_golden({"y": np.zeros(3, np.float32)}, expected, atol=1, rtol=1)
    assert shape is not None and "shape" in shape.reason


# -- Open Inference Protocol -------------------------------------------------------------------------

SPEC_IN = (TensorSpec("input", "float32", (-1, 4)), TensorSpec("mask", "int64", (-1, 4)))
SPEC_OUT = (TensorSpec("logits", "float32", (-1, 2)),)


def _body(inputs: list[dict[str, object]], **extra: object) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def test_json_tensors_flat_and_nested() -> None:
    request = parse_infer_request(
        _body(
            [
                {"name": "input", "shape": [2, 4], "datatype": "FP32", "data": list(range(8))},
                {"name": "mask", "shape": [2, 4], "datatype": "INT64", "data": [[1, 1, 1, 1], [1, 1, 0, 0]]},
            ],
            id="r1",
        )
    )
    assert request.id == "r1"
    assert request.inputs["input"].dtype == np.float32 and request.inputs["input"].shape == (2, 4)
    assert request.inputs["mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    check_request_fits(request, SPEC_IN, SPEC_OUT)


def test_binary_tensor_extension_round_trip() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    mask = np.ones((2, 4), np.int64)
    head = _body(
        [
            {"name": "input", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}},
            {"name": "mask", "shape": [2, 4], "datatype": "INT64", "parameters": {"binary_data_size": mask.nbytes}},
        ],
        outputs=[{"name": "logits", "parameters": {"binary_data": True}}],
    )
    request = parse_infer_request(head + x.tobytes() + mask.tobytes(), header_length=len(head))
    assert np.array_equal(request.inputs["input"], x) and np.array_equal(request.inputs["mask"], mask)
    logits = np.array([[0.5, -1.0], [2.0, 3.0]], np.float32)
    payload, json_length = encode_infer_response(request, {"logits": logits}, model_name="m", model_version=3)
    assert json_length is not None
    meta = json.loads(payload[:json_length])
    assert meta["model_version"] == "3"
    out = meta["outputs"][0]
    assert out["parameters"]["binary_data_size"] == logits.nbytes and "data" not in out
    assert np.array_equal(np.frombuffer(payload[json_length:], np.float32).reshape(2, 2), logits)


def test_json_response_selects_outputs() -> None:
    request = parse_infer_request(
        _body([{"name": "input", "shape": [1], "datatype": "FP32", "data": [1]}], outputs=[{"name": "b"}])
    )
    payload, json_length = encode_infer_response(
        request, {"a": np.zeros(1, np.float32), "b": np.array([[1, 2]], np.int64)}, model_name="m", model_version=1
    )
    assert json_length is None
    assert json.loads(payload)["outputs"] == [{"name": "b", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        (b"{nope", None, "not valid JSON"),
        (b"[]", None, "JSON object"),
        (b'{"inputs": []}', None, "non-empty list"),
        (_body([{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]), None, "needs 4 values"),
        (_body([{"name": "input", "shape": [1, 4], "datatype": "FP99", "data": [1]}]), None, "unsupported datatype"),
        (_body([{"name": "input", "shape": [-1, 4], "datatype": "FP32", "data": [1]}]), None, "non-negative"),
        (_body([{"name": "input", "shape": [2], "datatype": "FP32", "data": [[1], [2, 3]]}]), None, "data is not"),
        (_body([{"name": "input", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}]), None, "data is not"),
        (_body([{"name": "input", "shape": [2], "datatype": "FP32"}]), None, "no 'data'"),
        (_body([{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 2), None, "appears twice"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}', None, "not valid JSON"),
        (_body([{"name": "x", "shape": [1 << 20, 1 << 20], "datatype": "FP32", "data": [1]}]), None, "too large"),
        (
            _body([{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]),
            None,
            "binary part ends",
        ),
        (
            _body([{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 7}}]),
            None,
            "needs 8 bytes",
        ),
        (_body([{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]), 10_000, "does not fit"),
    ],
)
def test_malformed_requests_get_a_clear_error(body: bytes, header_length: int | None, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_infer_request(body, header_length=header_length)


def test_leftover_binary_bytes_are_refused() -> None:
    head = _body([{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}])
    with pytest.raises(InvalidInputError, match="inputs use 4"):
        parse_infer_request(head + b"\x00" * 8, header_length=len(head))


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        (
            [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": [0] * 4}],
            None,
            "FP64 does not match the model's FP32",
        ),
        ([{"name": "input", "shape": [1, 5], "datatype": "FP32", "data": [0] * 5}], None, "does not fit"),
        ([{"name": "other", "shape": [1], "datatype": "FP32", "data": [0]}], None, "no input 'other'"),
        ([{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}], None, "missing input"),
    ],
)
def test_requests_that_do_not_fit_the_model(inputs: list[dict[str, object]], outputs: object, message: str) -> None:
    request = parse_infer_request(_body(inputs))
    with pytest.raises(InvalidInputError, match=message):
        check_request_fits(request, SPEC_IN, SPEC_OUT)


def test_unknown_requested_output() -> None:
    request = parse_infer_request(
        _body(
            [
                {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4},
                {"name": "mask", "shape": [1, 4], "datatype": "INT64", "data": [0] * 4},
            ],
            outputs=[{"name": "nope"}],
        )
    )
    with pytest.raises(InvalidInputError, match="no output 'nope'"):
        check_request_fits(request, SPEC_IN, SPEC_OUT)


# -- backends' pure parts, configs -----------------------------------------------------------------


def test_provider_selection_keeps_available_ones_and_falls_back_to_cpu() -> None:
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(("tensorrt", "cuda", "cpu"), available) == available
    assert select_providers(("CUDAExecutionProvider",), available) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(("tensorrt", "cuda"), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert select_providers((), ["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_jetson_provider_options(tmp_path: Path) -> None:
    trt = provider_options("TensorrtExecutionProvider", InferenceOptions(cache_dir=tmp_path))
    assert trt["trt_fp16_enable"] == "True"
    assert trt["trt_engine_cache_enable"] == "True" and trt["trt_engine_cache_path"] == str(tmp_path / "tensorrt")
    assert trt["trt_timing_cache_path"] == str(tmp_path / "tensorrt")
    assert "trt_engine_cache_enable" not in provider_options("TensorrtExecutionProvider", InferenceOptions())
    assert provider_options("CUDAExecutionProvider", InferenceOptions())["cudnn_conv_algo_search"] == "HEURISTIC"
    assert provider_options("CPUExecutionProvider", InferenceOptions()) == {}


def test_version_comparison() -> None:
    assert version_at_least("1.17.3", "1.17")
    assert version_at_least("1.20.1+cu12", "1.18.0")
    assert not version_at_least("1.16.3", "1.17")
    assert version_at_least("2.3.0", "0")
    assert not version_at_least("1.17.0rc1", "1.17.1")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"intra_op_threads": -1}, "intra_op_threads"),
        ({"inter_op_threads": 65}, "inter_op_threads"),
        ({"litert_interpreters": 0}, "litert_interpreters"),
        ({"trt_workspace_bytes": 10}, "trt_workspace_bytes"),
    ],
)
def test_inference_options_are_validated(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        InferenceOptions(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_http_config_refuses_remote_binding_unless_asked() -> None:
    with pytest.raises(ConfigError, match="allow_remote"):
        HttpConfig(host="0.0.0.0")
    assert HttpConfig(host="0.0.0.0", allow_remote=True).host == "0.0.0.0"
    with pytest.raises(ConfigError):
        HttpConfig(max_body_bytes=10)
