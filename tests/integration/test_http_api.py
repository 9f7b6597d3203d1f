"""The Open Inference Protocol over real HTTP, on real models, with real concurrent clients."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.protocol.messages import ModelRef
from agent.runtime.host import ModelHost
from agent.runtime.http import HttpConfig, InferenceHttpServer
from agent.runtime.inference import InferenceOptions
from tests.support.models import bad as badmodels
from tests.support.models.serving import (
    DIGITS_HEALTH,
    ONNX,
    SELFIE_HEALTH,
    TFLITE,
    accuracy,
    digits_eval,
    digits_onnx,
    selfie_frames,
    selfie_tflite,
)

MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def digits() -> Path:
    return digits_onnx()


@pytest.fixture
def host() -> Iterator[ModelHost]:
    with ModelHost(InferenceOptions(intra_op_threads=1)) as h:
        yield h


@pytest.fixture
def server(host: ModelHost) -> Iterator[InferenceHttpServer]:
    with InferenceHttpServer(host, HttpConfig(port=0, max_body_bytes=MAX_BODY, idle_timeout_s=5)) as s:
        yield s


@pytest.fixture
def served(server: InferenceHttpServer, host: ModelHost, digits: Path) -> Iterator[Client]:
    """The digits model served as v1; a keep-alive client of the server."""
    serve(host, digits, ModelRef("digits", 1))
    c = Client(server)
    yield c
    c.close()


def serve(host: ModelHost, path: Path, ref: ModelRef, runtime: Any = ONNX) -> None:
    model = host.load(path, ref=ref, runtime=runtime)
    host.check(model, DIGITS_HEALTH if runtime is ONNX else SELFIE_HEALTH)
    host.activate(model)


class Client:
    """One keep-alive connection (http.client), JSON in and out."""

    def __init__(self, server: InferenceHttpServer) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    def json(self, method: str, path: str, obj: Any = None) -> tuple[int, Any]:
        body = json.dumps(obj).encode() if obj is not None else None
        status, _, payload = self.request(method, path, body, {"Content-Type": "application/json"} if body else None)
        return status, json.loads(payload)

    def close(self) -> None:
        self.conn.close()


ONE = np.ones((1, 1, 8, 8), np.float32)


def infer_body(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
        **extra,
    }


def test_health_and_metadata_follow_what_is_served(server: InferenceHttpServer, host: ModelHost, digits: Path) -> None:
    c = Client(server)
    assert c.json("GET", "/v2/health/live") == (200, {"live": True})
    assert c.json("GET", "/v2/health/ready")[0] == 503
    status, body = c.json("POST", "/v2/models/digits/infer", infer_body(ONE))
    assert status == 503 and "no model" in body["error"]
    assert c.json("GET", "/v2/models/digits")[0] == 503

    serve(host, digits, ModelRef("digits", 3))
    assert c.json("GET", "/v2/health/ready") == (200, {"ready": True})
    status, meta = c.json("GET", "/v2")
    assert status == 200 and "binary_tensor_data" in meta["extensions"]
    status, meta = c.json("GET", "/v2/models/digits")
    assert status == 200 and meta["versions"] == ["3"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert c.json("GET", "/v2/models/digits/versions/3")[0] == 200
    assert c.json("GET", "/v2/models/digits/versions/2")[0] == 404
    assert c.json("GET", "/v2/models/digits/ready")[1]["ready"] is True
    assert c.json("GET", "/v2/models/digits/versions/3/ready")[0] == 200
    assert c.json("GET", "/v2/models/other/ready")[0] == 404
    c.close()


def test_json_inference_is_accurate_and_counted(served: Client) -> None:
    x, labels = digits_eval()
    c = served
    status, body = c.json("POST", "/v2/models/digits/infer", infer_body(x, id="batch-1"))
    assert status == 200, body
    assert body["model_name"] == "digits" and body["model_version"] == "1" and body["id"] == "batch-1"
    logits = next(o for o in body["outputs"] if o["name"] == "logits")
    assert logits["shape"] == [len(x), 10] and logits["datatype"] == "FP32"
    assert accuracy(np.array(logits["data"]).reshape(-1, 10), labels) > 0.9
    status, body = c.json("POST", "/v2/models/digits/versions/1/infer", infer_body(x[:1], outputs=[{"name": "logits"}]))
    assert status == 200 and [o["name"] for o in body["outputs"]] == ["logits"]
    assert np.argmax(body["outputs"][0]["data"]) == labels[0]
    status, stats = c.json("GET", "/v2/models/digits/stats")
    assert status == 200 and stats["requests"] == 2 and stats["errors"] == 0


def infer_binary(
    c: Client, model: str, name: str, x: np.ndarray, request: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], bytes]:
    """POST ``x`` as the one FP32 input ``name`` in binary tensor data (KServe's binary extension), the rest of
    the JSON header from ``request``; the status, the response's JSON part and its binary rest (all of the body
    when the status is not 200)."""
    head = json.dumps({
        "inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        **request,
    }).encode()
    status, got, payload = c.request("POST", f"/v2/models/{model}/infer", head + x.tobytes(),
                                     {"Inference-Header-Content-Length": str(len(head)), **(headers or {})})
    if status != 200:
        return status, {}, payload
    json_length = int(got["Inference-Header-Content-Length"])
    return status, json.loads(payload[:json_length]), payload[json_length:]


def test_binary_tensor_data_both_ways(served: Client, host: ModelHost) -> None:
    x = digits_eval(16)[0]
    status, meta, payload = infer_binary(served, "digits", "pixels", x,
                                         {"outputs": [{"name": "logits", "parameters": {"binary_data": True}}]},
                                         {"Content-Type": "application/octet-stream"})
    assert status == 200, payload
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 16 * 10 * 4
    logits = np.frombuffer(payload, "<f4").reshape(16, 10)
    assert np.allclose(logits, host.infer({"pixels": x})["logits"], atol=1e-6)


def test_malformed_requests_get_4xx_and_the_connection_keeps_working(served: Client, host: ModelHost) -> None:
    c = served
    good = json.dumps(infer_body(ONE)).encode()
    cases: list[tuple[str, str, bytes | None, dict[str, str], int, str]] = [
        ("POST", "/v2/models/digits/infer", b"{not json", {}, 400, "not valid JSON"),
        (
            "POST",
            "/v2/models/digits/infer",
            json.dumps(
                {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "INT64", "data": [1] * 64}]}
            ).encode(),
            {},
            400,
            "INT64 does not match the model's FP32",
        ),
        (
            "POST",
            "/v2/models/digits/infer",
            json.dumps(infer_body(ONE[..., :4])).encode(),
            {},
            400,
            "does not fit",
        ),
        ("POST", "/v2/models/nope/infer", good, {}, 404, "nope is not being served"),
        ("POST", "/v2/models/digits/versions/9/infer", good, {}, 404, "version 9"),
        ("POST", "/v2/models/digits/versions/latest/infer", good, {}, 404, "not a version number"),
        ("GET", "/v2/models/digits/infer", None, {}, 405, "use POST"),
        ("POST", "/v2/models/digits", good, {}, 405, "use GET"),
        ("GET", "/v1/models", None, {}, 404, "under /v2"),
        ("POST", "/v2/models/digits/infer", good, {"Inference-Header-Content-Length": "x"}, 400, "must be an integer"),
    ]
    for method, path, body, headers, want, message in cases:
        status, _, payload = c.request(method, path, body, headers)
        assert status == want, (path, payload)
        assert message in json.loads(payload)["error"], payload
    status, _, payload = c.request("POST", "/v2/models/digits/infer", good)  # same connection, still in sync
    assert status == 200, payload
    stats = host.stats(version=1)
    assert (stats.requests, stats.errors) == (1, 0)  # the clients' mistakes never reached the model


def test_oversized_and_unsized_bodies_are_refused_before_reading(server: InferenceHttpServer, served: Client) -> None:
    status, _, payload = served.request("POST", "/v2/models/digits/infer", b" " * (MAX_BODY + 1))
    assert status == 413 and "limit" in json.loads(payload)["error"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % (MAX_BODY * 4)
        )
        assert raw.recv(4096).startswith(b"HTTP/1.1 413")  # refused before the client sent a byte of body
    good = json.dumps(infer_body(ONE)).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(good)
        )
        assert raw.recv(4096).startswith(b"HTTP/1.1 100")
        raw.sendall(good)
        assert raw.recv(65536).startswith(b"HTTP/1.1 200")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 411")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 411")


def test_runtime_failures_are_500_and_counted(
    server: InferenceHttpServer, host: ModelHost, digits: Path, tmp_path: Path
) -> None:
    fragile = badmodels.failing_on_real_data_variant(digits, tmp_path / "fragile.onnx")
    serve(host, fragile, ModelRef("digits", 2))
    c = Client(server)
    status, body = c.json("POST", "/v2/models/digits/infer", infer_body(digits_eval(1)[0]))  # a real digit
    assert status == 500 and "Gather" in body["error"]
    assert c.json("POST", "/v2/models/digits/infer", infer_body(np.full((1, 1, 8, 8), 0.5, np.float32)))[0] == 200
    stats = host.stats(version=2)
    assert (stats.requests, stats.errors) == (2, 1)
    c.close()


def test_serves_onnx_and_tflite_models_over_http(digits: Path) -> None:
    with (
        ModelHost(InferenceOptions(intra_op_threads=1)) as onnx_host,
        ModelHost(InferenceOptions(intra_op_threads=1)) as tflite_host,
        InferenceHttpServer(onnx_host, HttpConfig(port=0)) as onnx_server,
        InferenceHttpServer(tflite_host, HttpConfig(port=0)) as tflite_server,
    ):
        serve(onnx_host, digits, ModelRef("digits", 1))
        serve(tflite_host, selfie_tflite(), ModelRef("selfie", 4), TFLITE)
        x, labels = digits_eval(50)
        c = Client(onnx_server)
        status, body = c.json("POST", "/v2/models/digits/infer", infer_body(x))
        assert status == 200
        assert accuracy(np.array(body["outputs"][0]["data"]).reshape(-1, 10), labels) > 0.85
        c.close()

        frame = selfie_frames(1)
        c = Client(tflite_server)
        status, meta = c.json("GET", "/v2/models/selfie")
        assert status == 200 and meta["platform"] == "tensorflow_lite" and meta["versions"] == ["4"]
        binary_out = {"parameters": {"binary_data_output": True}}
        status, meta, payload = infer_binary(c, "selfie", "input_1", frame, binary_out)
        assert status == 200, payload
        out = meta["outputs"][0]
        assert out["name"] == "activation_10" and out["shape"] == [1, 256, 256, 1]
        mask = np.frombuffer(payload, "<f4").reshape(1, 256, 256, 1)
        assert np.allclose(mask, tflite_host.infer({"input_1": frame})["activation_10"])
        c.close()


def test_concurrent_clients_see_zero_failures_across_many_swaps(
    server: InferenceHttpServer, host: ModelHost, digits: Path, tmp_path: Path
) -> None:
    v2 = badmodels.identity_variant(digits, tmp_path / "v2.onnx")
    files = {1: digits, 2: v2}
    serve(host, digits, ModelRef("digits", 1))
    x = digits_eval(4)[0]
    body = json.dumps(infer_body(x)).encode()
    want = host.infer({"pixels": x})["logits"]
    stop = threading.Event()
    problems: list[str] = []
    versions_seen: list[set[str]] = []
    counts: list[int] = []

    def client() -> None:
        c = Client(server)
        seen: set[str] = set()
        n = 0
        try:
            while not stop.is_set():
                status, _, payload = c.request("POST", "/v2/models/digits/infer", body)
                if status != 200:
                    problems.append(f"{status}: {payload[:200]!r}")
                    return
                result = json.loads(payload)
                got = np.array(result["outputs"][0]["data"], np.float32).reshape(want.shape)
                if not np.allclose(got, want, atol=1e-5):
                    problems.append("wrong answer")
                    return
                seen.add(result["model_version"])
                n += 1
        except Exception as exc:
            problems.append(repr(exc))
        finally:
            c.close()
            versions_seen.append(seen)
            counts.append(n)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    swaps = 24
    try:
        for swap in range(swaps):
            version = 2 if swap % 2 == 0 else 1
            model = host.load(files[version], ref=ModelRef("digits", version), runtime=ONNX)
            host.check(model, DIGITS_HEALTH)
            host.activate(model)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert problems == []
    assert sum(counts) > swaps and all(n > 0 for n in counts)
    assert set().union(*versions_seen) == {"1", "2"}
    assert len(host.loaded()) == 1
    assert host.stats().errors == 0


def test_connection_cap_and_close_release_everything(host: ModelHost, digits: Path) -> None:
    serve(host, digits, ModelRef("digits", 1))
    server = InferenceHttpServer(host, HttpConfig(port=0, max_connections=2)).start()
    held = [Client(server), Client(server)]
    for c in held:
        assert c.json("GET", "/v2/health/live")[0] == 200  # both connections open and kept alive
    extra = Client(server)
    status, _, payload = extra.request("GET", "/v2/health/live")
    assert status == 503 and b"too many" in payload
    extra.close()
    port = server.port
    server.close()
    for c in held:
        with pytest.raises((http.client.HTTPException, OSError)):
            c.request("GET", "/v2/health/live")
        c.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
