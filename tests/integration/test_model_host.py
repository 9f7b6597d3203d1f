"""ModelHost with real runtimes and real models: load, health check, hot swap, stats, failure modes."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.api import LocalModel
from agent.errors import (
    HealthCheckError,
    InferenceError,
    InvalidInputError,
    ModelError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from agent.protocol.messages import GoldenCase, ModelRef, RuntimeSpec
from agent.runtime.host import ModelHost, Served
from agent.runtime.inference import InferenceOptions
from agent.runtime.tensors import tensor_from_array
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

V1 = ModelRef("digits", 1)
V2 = ModelRef("digits", 2)
ONE = np.ones((1, 1, 8, 8), np.float32)


@pytest.fixture(scope="module")
def digits() -> Path:
    return digits_onnx()


@pytest.fixture(scope="module")
def variants(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("variants")
    return {
        "v2": badmodels.identity_variant(digits, d / "v2.onnx"),
        "nan": badmodels.nan_variant(digits, d / "nan.onnx"),
        "shape": badmodels.wrong_shape_variant(digits, d / "shape.onnx"),
        "dtype": badmodels.wrong_dtype_variant(digits, d / "dtype.onnx"),
        "slow": badmodels.slow_variant(digits, d / "slow.onnx", extra_ms=4 * DIGITS_HEALTH.latency_budget_ms),
        "fragile": badmodels.failing_on_real_data_variant(digits, d / "fragile.onnx"),
    }


@pytest.fixture
def host() -> Iterator[ModelHost]:
    with ModelHost(InferenceOptions(intra_op_threads=1)) as h:
        yield h


def test_serves_a_real_classifier_accurately(host: ModelHost, digits: Path) -> None:
    model = host.load(digits, ref=V1, runtime=ONNX)
    assert model.providers == ("CPUExecutionProvider",) and model.backend.startswith("onnxruntime")
    assert [s.name for s in model.inputs] == ["pixels"] and model.inputs[0].shape == (-1, 1, 8, 8)
    report = host.check(model, DIGITS_HEALTH)
    assert report.checks == ("load", "dtype", "shape", "finite", "latency")
    assert report.runs == 1 + DIGITS_HEALTH.warmup_runs
    assert host.activate(model) is None
    x, labels = digits_eval()
    assert accuracy(host.infer({"pixels": x})["logits"], labels) > 0.9


@pytest.mark.parametrize(
    ("variant", "check"),
    [("nan", "finite"), ("shape", "shape"), ("dtype", "dtype"), ("slow", "latency")],
)
def test_bad_versions_fail_the_right_check(
    host: ModelHost, digits: Path, variants: dict[str, Path], variant: str, check: str
) -> None:
    v1 = host.load(digits, ref=V1, runtime=ONNX)
    host.activate(v1)
    bad = host.load(variants[variant], ref=V2, runtime=ONNX)
    with pytest.raises(HealthCheckError) as info:
        host.check(bad, DIGITS_HEALTH)
    assert info.value.check == check, info.value
    host.unload(bad)
    assert host.active == v1  # the failed candidate never served
    assert host.loaded() == [v1]
    assert host.infer({"pixels": ONE})["logits"].shape == (1, 10)


def test_golden_outputs_pass_for_the_same_model_and_fail_for_another(
    host: ModelHost, digits: Path, tmp_path: Path
) -> None:
    x = digits_eval(4)[0]
    reference = host.load(digits, ref=V1, runtime=ONNX)
    expected = host._slots[reference.load_id].session.run({"pixels": x})  # what the server measured
    golden = GoldenCase(
        inputs={"pixels": tensor_from_array(x)},
        outputs={"logits": tensor_from_array(expected["logits"])},
        atol=1e-4,
        rtol=1e-3,
    )
    health = replace(DIGITS_HEALTH, golden=(golden,))
    report = host.check(reference, health)
    assert report.checks[-1] == "golden" and report.golden_max_abs_err is not None
    assert report.golden_max_abs_err < 1e-4

    off = badmodels.scaled_output_variant(digits, tmp_path / "off.onnx", factor=1.1)
    other = host.load(off, ref=V2, runtime=ONNX)  # runs, finite, right shape: only the numbers are off
    with pytest.raises(HealthCheckError) as info:
        host.check(other, health)
    assert info.value.check == "golden" and "outside atol" in info.value.reason

    truncated = replace(golden, inputs={"pixels": replace(golden.inputs["pixels"], data=b"\x00" * 8)})
    with pytest.raises(HealthCheckError) as info:
        host.check(reference, replace(DIGITS_HEALTH, golden=(truncated,)))
    assert info.value.check == "golden"


def test_declared_inputs_that_do_not_match_the_model_fail(host: ModelHost, digits: Path) -> None:
    model = host.load(digits, ref=V1, runtime=ONNX)
    wrong_dtype = replace(DIGITS_HEALTH, inputs=(replace(DIGITS_HEALTH.inputs[0], dtype="int64"),))
    with pytest.raises(HealthCheckError) as info:
        host.check(model, wrong_dtype)
    assert info.value.check == "dtype"
    wrong_name = replace(DIGITS_HEALTH, inputs=(replace(DIGITS_HEALTH.inputs[0], name="image"),))
    with pytest.raises(HealthCheckError) as info:
        host.check(model, wrong_name)
    assert info.value.check == "shape" and "image" in info.value.reason


def test_a_model_that_fails_only_on_real_data_passes_warm_up_and_shows_in_the_error_rate(
    host: ModelHost, variants: dict[str, Path]
) -> None:
    fragile = host.load(variants["fragile"], ref=V2, runtime=ONNX)
    host.check(fragile, DIGITS_HEALTH)  # random probes: passes
    host.activate(fragile)
    x = digits_eval(20)[0]
    failures = 0
    for i in range(len(x)):
        try:
            host.infer({"pixels": x[i : i + 1]})
        except InferenceError:
            failures += 1
    stats = host.stats(version=2)
    assert failures == stats.errors == 20  # every real digit has black pixels
    assert stats.requests == 20 and stats.error_rate == 1.0


def test_corrupt_and_truncated_files_raise_model_load_error(host: ModelHost, digits: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07definitely not a protobuf" * 10)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(digits.read_bytes()[: digits.stat().st_size // 2])
    for path in (garbage, truncated, tmp_path / "missing.onnx"):
        with pytest.raises(ModelLoadError):
            host.load(path, ref=V2, runtime=ONNX)
    tflite = tmp_path / "garbage.tflite"
    tflite.write_bytes(b"TFL3" + b"\x00" * 64)
    with pytest.raises(ModelLoadError):
        host.load(tflite, ref=V2, runtime=TFLITE)
    with pytest.raises(ModelLoadError, match="cannot load format"):
        host.load(digits, ref=V2, runtime=RuntimeSpec(format="onnx", runtime="litert"))
    with pytest.raises(ModelLoadError, match="needs onnxruntime >= 99"):
        host.load(digits, ref=V2, runtime=replace(ONNX, min_version="99.0"))
    assert host.loaded() == []


def test_unavailable_accelerators_fall_back_to_cpu(host: ModelHost, digits: Path, tmp_path: Path) -> None:
    jetson = RuntimeSpec(
        format="onnx", runtime="onnxruntime", execution_providers=("tensorrt", "cuda", "CPUExecutionProvider")
    )
    with ModelHost(InferenceOptions(intra_op_threads=1, cache_dir=tmp_path)) as h:
        model = h.load(digits, ref=V1, runtime=jetson)
        assert model.providers[-1] == "CPUExecutionProvider"
        h.check(model, DIGITS_HEALTH)


def test_litert_model_serves_through_the_same_host(host: ModelHost) -> None:
    coral = RuntimeSpec(format="tflite", runtime="litert", execution_providers=("edgetpu",))
    model = host.load(selfie_tflite(), ref=ModelRef("selfie", 1), runtime=coral)  # no Edge TPU here: CPU
    assert model.providers == ("cpu",) and model.inputs[0].shape == (1, 256, 256, 3)
    report = host.check(model, SELFIE_HEALTH)
    assert "finite" in report.checks
    host.activate(model)
    frame = selfie_frames(1)
    mask = host.infer({"input_1": frame})["activation_10"]
    assert mask.shape == (1, 256, 256, 1) and np.isfinite(mask).all()
    assert (mask >= 0).all() and (mask <= 1).all()  # a sigmoid mask
    with pytest.raises(InvalidInputError, match="shape"):
        host.infer({"input_1": frame[:, :128]})


def test_requests_are_validated_before_the_runtime(host: ModelHost, digits: Path) -> None:
    with pytest.raises(ModelNotReadyError):
        host.infer({"pixels": ONE})
    host.activate(host.load(digits, ref=V1, runtime=ONNX))
    cases = [
        ({"pixels": ONE.astype(np.float64)}, "float32"),
        ({"pixels": ONE[..., :7]}, "shape"),
        ({}, "missing"),
        ({"pixels": ONE, "extra": np.ones(1, np.float32)}, "no input 'extra'"),
        ({"pixels": ONE.tolist()}, "numpy array"),
    ]
    for inputs, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            host.infer(inputs)  # type: ignore[arg-type]
    with pytest.raises(ModelNotFoundError):
        host.run({"pixels": ONE}, version=7)
    stats = host.stats(version=1)
    assert stats.rejected == len(cases) and stats.requests == 0  # the client's mistakes are not the model's errors


def test_hot_swap_under_load_fails_no_request_and_releases_old_sessions(
    host: ModelHost, digits: Path, variants: dict[str, Path]
) -> None:
    files = {1: digits, 2: variants["v2"]}
    host.activate(host.load(digits, ref=V1, runtime=ONNX))
    x = digits_eval(8)[0]
    want = host.infer({"pixels": x})["logits"]
    stop = threading.Event()
    failures: list[BaseException] = []
    served: dict[int, int] = {1: 0, 2: 0}
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            try:
                result = host.run({"pixels": x})
                assert np.allclose(result.outputs["logits"], want, atol=1e-5)
                with lock:
                    served[result.model.ref.version] += 1
            except BaseException as exc:
                failures.append(exc)
                return

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for swap in range(20):
            version = 2 if swap % 2 == 0 else 1
            model = host.load(files[version], ref=ModelRef("digits", version), runtime=ONNX)
            host.check(model, DIGITS_HEALTH)
            previous = host.activate(model)
            assert previous is not None and previous.ref.version != version
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert served[1] > 0 and served[2] > 0
    assert len(host.loaded()) == 1  # every replaced session drained and was released
    total = host.stats()
    assert total.errors == 0 and total.requests == served[1] + served[2] + 1


def test_keep_previous_holds_the_old_version_for_an_instant_switch_back(
    host: ModelHost, digits: Path, variants: dict[str, Path]
) -> None:
    v1 = host.load(digits, ref=V1, runtime=ONNX)
    host.activate(v1)
    v2 = host.load(variants["v2"], ref=V2, runtime=ONNX)
    assert host.activate(v2, keep_previous=True) == v1
    assert set(host.loaded()) == {v1, v2}
    assert host.activate(v1) == v2  # the rollback: no load, no warm-up
    assert host.loaded() == [v1]
    with pytest.raises(ModelError):
        host.activate(v2)  # released: must be loaded again
    with pytest.raises(ModelError):
        host.unload(v1)  # serving
    assert host.deactivate() == v1
    with pytest.raises(ModelNotReadyError):
        host.infer({"pixels": ONE})


def test_stats_are_per_version_and_since_a_switch(host: ModelHost, digits: Path, variants: dict[str, Path]) -> None:
    x = ONE
    host.activate(host.load(digits, ref=V1, runtime=ONNX))
    for _ in range(5):
        host.infer({"pixels": x})
    host.activate(host.load(variants["nan"], ref=V2, runtime=ONNX))  # unchecked on purpose
    switched = host.activated_at
    for _ in range(3):
        host.infer({"pixels": x})
    v1, v2 = host.stats(version=1), host.stats(version=2, since=switched)
    assert (v1.requests, v1.errors) == (5, 0)
    assert (v2.requests, v2.errors, v2.nonfinite) == (3, 3, 3)  # NaN answers count against the model
    assert v1.p50_ms is not None and v1.p50_ms > 0


def test_close_waits_for_requests_in_flight(digits: Path, variants: dict[str, Path]) -> None:
    host = ModelHost(InferenceOptions(intra_op_threads=1))
    slow = host.load(variants["slow"], ref=V1, runtime=ONNX)
    host.activate(slow)
    results: list[object] = []
    t = threading.Thread(target=lambda: results.append(host.infer({"pixels": ONE})))
    t.start()
    while host.stats().requests == 0 and not host._slots[slow.load_id].inflight:
        pass
    host.close(drain_timeout_s=30)
    t.join()
    assert len(results) == 1 and host.loaded() == []
    with pytest.raises(ModelLoadError):
        host.load(digits, ref=V2, runtime=ONNX)


def test_local_api_casts_within_a_kind_and_refuses_lossy_casts(digits: Path) -> None:
    with LocalModel.open(digits, name="digits", threads=1, health=DIGITS_HEALTH) as model:
        assert model.ready() and model.ref == ModelRef("digits", 1)
        x, labels = digits_eval()
        logits = model(x.astype(np.float64))["logits"]  # float64 -> float32
        assert accuracy(logits, labels) > 0.9
        assert model.infer({"pixels": x[:1].tolist()})["logits"].shape == (1, 10)
        with pytest.raises(InvalidInputError, match="lossy"):
            model.infer(ONE.astype(np.complex64))
        assert model.stats().requests == 2
    with pytest.raises(ModelLoadError):
        LocalModel.open(digits.with_suffix(".pt"))


def test_a_request_in_flight_finishes_on_the_old_session_which_is_released_after(
    host: ModelHost, digits: Path, variants: dict[str, Path]
) -> None:
    slow = host.load(variants["slow"], ref=V1, runtime=ONNX)  # ~1 s per inference
    host.activate(slow)
    result: list[object] = []
    request = threading.Thread(target=lambda: result.append(host.run({"pixels": ONE})))
    request.start()
    while not host._slots[slow.load_id].inflight:
        pass
    fast = host.load(digits, ref=V2, runtime=ONNX)
    assert host.activate(fast) is slow  # returns at once: it does not wait for the request
    assert host.active is fast and set(host.loaded()) == {slow, fast}  # the old one drains
    assert host.run({"pixels": ONE}).model is fast  # new requests go to the new version meanwhile
    request.join()
    served = result[0]
    assert isinstance(served, Served) and served.model is slow and served.outputs["logits"].shape == (1, 10)
    assert host.loaded() == [fast]  # released once its last request drained


def test_a_missing_runtime_is_a_clear_load_error(
    host: ModelHost, digits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # neither LiteRT package importable
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    with pytest.raises(ModelLoadError, match="no LiteRT runtime"):
        host.load(selfie_tflite(), ref=ModelRef("selfie", 1), runtime=TFLITE)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelLoadError, match="onnxruntime is not installed"):
        host.load(digits, ref=V1, runtime=ONNX)
