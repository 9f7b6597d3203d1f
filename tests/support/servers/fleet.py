"""Helpers for control-plane tests: a server home on a test broker, small real ONNX builds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.protocol.messages import HealthSpec, RuntimeSpec, TensorSpec
from server.broker import MosquittoBroker
from server.builds import Build, StaticBuilds
from server.config import ServerConfig, config_from_mapping
from server.keys import init_signing_key, load_signing_key
from tests.support.servers.settings import server_settings


def write_onnx(path: Path, *, seed: int, inputs: int = 64, outputs: int = 10, hidden: int = 256) -> Path:
    """A small real ONNX model (MatMul -> Relu -> MatMul) with seeded weights; different seed, different bytes."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((inputs, hidden)).astype(np.float32) * 0.1
    w2 = rng.standard_normal((hidden, outputs)).astype(np.float32) * 0.1
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "edgefleet-test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, outputs])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def health(inputs: int = 64, outputs: int = 10, probation_s: float = 0.5) -> HealthSpec:
    return HealthSpec(
        inputs=(TensorSpec("x", "float32", (1, inputs)),),
        outputs=(TensorSpec("y", "float32", (1, outputs)),),
        latency_budget_ms=50.0,
        probation_s=probation_s,
    )


def onnx_builds(root: Path, model: str, versions: list[int], profiles: list[str], *, chunk_size: int = 16 * 1024,
                builds: StaticBuilds | None = None, hidden: int = 256) -> StaticBuilds:
    builds = builds or StaticBuilds()
    for v in versions:
        for p in profiles:
            path = write_onnx(root / f"{model}-v{v}-{p}.onnx", seed=v * 100 + len(p), hidden=hidden)
            builds.add(Build(model=model, version=v, profile=p, variant="fp32", path=path,
                             runtime=RuntimeSpec("onnx", "onnxruntime"), health=health(),
                             chunk_size=chunk_size, compression="lzma"))
    return builds


def server_config(
    home: Path, mqtt: MosquittoBroker, overrides: dict[str, dict[str, Any]] | None = None
) -> ServerConfig:
    data = server_settings(f"mqtt://{mqtt.host}:{mqtt.port}", f"srv-{home.name}", device_timeout_s=30.0,
                           overrides=overrides)
    home.mkdir(parents=True, exist_ok=True)
    init_signing_key(ServerConfig(home=home).paths)
    return config_from_mapping(home, data)


def public_key(config: ServerConfig):  # type: ignore[no-untyped-def]
    return load_signing_key(config.paths).public_key()


class Fleet:
    """An in-process FleetServer on a test broker plus device stand-ins; closes everything it made."""

    def __init__(self, tmp: Path, broker: MosquittoBroker, builds: StaticBuilds,
                 overrides: dict[str, dict[str, Any]] | None = None) -> None:
        from server.app import FleetServer

        self.tmp = tmp
        self.broker = broker
        self.builds = builds
        self.config = server_config(tmp / "home", broker, overrides)
        self.server = FleetServer(self.config, builds=builds).start()
        self.devices: list[Any] = []

    @property
    def service(self):  # type: ignore[no-untyped-def]
        return self.server.service

    def device(self, device_id: str, *, profile: str = "rpi4", groups: tuple[str, ...] = ("g",),
               connect: bool = True, seed: tuple[str, int] | None = None, fail: set[int] | None = None,
               register: bool = True) -> Any:
        from tests.support.device import DeviceUnderTest

        d = DeviceUnderTest(device_id, host=self.broker.host, port=self.broker.port,
                      server_public_key=public_key(self.config), profile=profile, fail_versions=fail)
        if seed:
            d.seed(*seed)
        if register:
            self.service.register_device(device_id, profile=profile, public_key=d.public_key_b64, groups=groups)
        self.devices.append(d)
        if connect:
            d.connect()
        return d

    def wait_online(self, *devices: Any, stall_s: float = 60.0, online: bool = True) -> None:
        """Until the registry sees every one of ``devices`` online (``online=False``: offline), as long as
        one more gets there every ``stall_s`` (a loaded machine is slow, not stuck)."""
        from tests.support.waiting import wait_progress

        late: list[str] = [d.device_id for d in devices]

        def done() -> bool:
            seen = {d.device_id for d in self.server.registry.list_devices() if d.online == online}
            late[:] = [d.device_id for d in devices if d.device_id not in seen]
            return not late

        wait_progress(done, what=f"devices going {'online' if online else 'offline'}", progress=lambda: len(late),
                      describe=lambda: f"still not there: {late}", stall_s=stall_s, interval_s=0.05)

    def wait_deployment(self, deployment_id: str, statuses: tuple[str, ...], timeout: float = 30.0) -> dict[str, Any]:
        """Until the deployment's status is one of ``statuses`` (see ``wait_rows`` for how long)."""
        return self._wait_detail(deployment_id, lambda detail: detail["status"] in statuses,
                                 f"reaching {statuses}", timeout)

    def wait_rows(self, deployment_id: str, predicate: Any, timeout: float = 30.0) -> dict[str, Any]:
        """Until ``predicate`` holds for the deployment's rows by device id, as long as the deployment moves (its
        status or a device's state) at least every ``max(timeout, 60)`` s: a loaded machine is slow, not stuck
        (tests/support/waiting.py); 300 s at most."""
        return self._wait_detail(deployment_id,
                                 lambda detail: predicate({d["device_id"]: d for d in detail["devices"]}),
                                 "rows meeting the condition", timeout)

    def _wait_detail(self, deployment_id: str, ready: Any, what: str, timeout: float) -> dict[str, Any]:
        from tests.support.waiting import wait_progress

        detail: dict[str, Any] = {}

        def done() -> bool:
            detail.clear()
            detail.update(self.service.deployment_detail(deployment_id))
            return bool(ready(detail))

        def rows() -> tuple[Any, ...]:
            return tuple((d["device_id"], d["state"], d["reason"]) for d in detail.get("devices", []))

        wait_progress(done, what=f"deployment {deployment_id} {what}", progress=lambda: (detail.get("status"), rows()),
                      describe=lambda: f"status {detail.get('status')}: {list(rows())}",
                      stall_s=max(timeout, 60.0), cap_s=max(timeout, 300.0), interval_s=0.1)
        return detail

    def token(self, name: str, role: str) -> str:
        """A new API token with ``role``, registered as ``name``."""
        from server.keys import new_token, token_digest

        token = new_token()
        self.server.registry.add_token(name, token_digest(token), role=role)
        return token

    def close(self) -> None:
        for d in self.devices:
            d.close()
        self.server.stop()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
