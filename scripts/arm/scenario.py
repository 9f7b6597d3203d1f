"""The end-to-end scenario: the agent inside the emulated aarch64 root filesystem, everything else on the host.

Host: mosquitto with TLS, per-client passwords and the device ACL (``server.broker.MosquittoBroker``), the
test stand-in for the server (``tests.support.fleet_server.FleetServer``: real signing, key wrapping and chunk
serving), and the ``raspberry-pi-5`` builds (``scripts.arm.variants``). Emulated: ``edgefleet-agent init`` and
``edgefleet-agent run`` under qemu-aarch64 in the chroot, which shares the host's network, so the agent
reaches the broker on 127.0.0.1 and the host reaches the agent's local HTTP API.

Steps: enrol (the device's enroll request carries its key and ``arch``; the server approves the key the
device printed), deploy fp32 v1, hot-swap to the int8 v2 under a stream of requests (none may fail), check
telemetry says ``aarch64``, roll back by command, deploy the LiteRT selfie model, stop cleanly.

Emulation is ~50x slower than the board: ``lifecycle.latency_scale`` in the agent's config scales the
profile's latency budget there (the builds keep the real 200 ms of raspberry-pi-5).
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent.protocol.messages import ModelRef
from scripts.arm.rootfs import QEMU_CPU, VENV, ArmCheckError, chroot, log
from scripts.arm.steps import Steps
from scripts.arm.variants import PROFILE, Variants, build_variants
from server.broker import SERVER_USER, BrokerSecurity, MosquittoBroker, free_port, generate_tls
from tests.support.agent_process import write_config
from tests.support.fleet_server import FleetServer

#: The agent's settings for an emulated board (each a documented config knob; the defaults stay the real ones).
EMULATION: dict[str, dict[str, Any]] = {
    "lifecycle": {"latency_scale": 50.0, "probation_check_s": 0.5},
    "telemetry": {"interval_s": 2.0},
    "transfer": {"chunk_timeout_s": 5.0, "chunk_timeout_max_s": 20.0, "progress_interval_s": 2.0},
    "broker": {"reconnect_min_s": 0.5, "reconnect_max_s": 2.0},
    "inference": {"intra_op_threads": 1},
    "log": {"format": "json", "level": "info"},
}
WORK_IN = "/tmp/edgefleet-arm"  # inside the rootfs
EMULATED_TIMEOUT = 300.0
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"


def expect(ok: bool, message: str) -> None:
    if not ok:
        raise ArmCheckError(message)


class EmulatedAgent:
    """``edgefleet-agent`` in the chroot: init, run (a real process: SIGTERM stops it, SIGKILL on timeout)."""

    def __init__(self, root: Path, device_id: str) -> None:
        self.root = root
        self.device_id = device_id
        self.work = root / WORK_IN.lstrip("/")
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        self.http_port = free_port()
        self.config_in = f"{WORK_IN}/etc/agent.toml"
        self.log_path = self.work / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def host_path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def init(self, *, server_pub: bytes, ca_cert: bytes, broker_port: int, password: str) -> str:
        """Run ``edgefleet-agent init`` in the chroot; returns the device public key it printed (base64)."""
        for name, data in (("server.pub", server_pub), ("ca.crt", ca_cert), ("pw", password.encode())):
            (self.work / name).write_bytes(data)
        out = chroot(
            self.root,
            [
                f"{VENV}/bin/edgefleet-agent",
                "init",
                "--device-id",
                self.device_id,
                "--profile",
                PROFILE,
                "--server-key",
                f"{WORK_IN}/server.pub",
                "--broker",
                f"127.0.0.1:{broker_port}",
                "--tls",
                "--ca-cert",
                f"{WORK_IN}/ca.crt",
                "--username",
                self.device_id,
                "--password-file",
                f"{WORK_IN}/pw",
                "--config",
                self.config_in,
                "--store-dir",
                f"{WORK_IN}/store",
                "--http-port",
                str(self.http_port),
            ],
            what="edgefleet-agent init (emulated)",
            timeout=EMULATED_TIMEOUT,
        )
        (self.work / "pw").unlink()
        public = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("device public key")), ""
        )
        if not public:
            raise ArmCheckError(f"edgefleet-agent init printed no public key:\n{out}")
        self._apply_emulation_settings()
        return public

    def _apply_emulation_settings(self) -> None:
        import tomllib  # noqa: PLC0415 - the host runs 3.11+

        path = self.host_path(self.config_in)
        settings: dict[str, Any] = tomllib.loads(path.read_text())
        for section, values in EMULATION.items():
            settings[section] = {**settings.get(section, {}), **values}
        write_config(path, settings)

    def start(self) -> None:
        log_file = self.log_path.open("ab")
        env = {"PATH": f"{VENV}/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
        env["QEMU_CPU"] = QEMU_CPU
        self.proc = subprocess.Popen(
            [CHROOT, str(self.root), f"{VENV}/bin/edgefleet-agent", "run", "--config", self.config_in],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log_file.close()

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ArmCheckError(f"the emulated agent exited with {self.proc.returncode}:\n{self.log_tail()}")

    # -- the local HTTP API (Open Inference Protocol), reached from the host --------------------------------------

    def http(self, path: str, body: dict[str, Any] | None = None, *, timeout: float = 60.0) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=data,
            headers={"Content-Type": "application/json"} if data else {},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def infer(self, model: str, name: str, array: np.ndarray) -> tuple[int, Any]:
        body = {
            "inputs": [{"name": name, "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist()}]
        }
        return self.http(f"/v2/models/{model}/infer", body)

    def output(self, model: str, name: str, array: np.ndarray, out: str) -> tuple[str, np.ndarray]:
        status, body = self.infer(model, name, array)
        expect(status == 200, f"infer {model}: HTTP {status}: {body}")
        (item,) = [o for o in body["outputs"] if o["name"] == out]
        return str(body.get("model_version")), np.asarray(item["data"], dtype=np.float32).reshape(item["shape"])

    def wait_ready(self, timeout: float = EMULATED_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.alive()
            with contextlib.suppress(OSError):
                if self.http("/v2/health/ready", timeout=5.0)[0] == 200:
                    return
            time.sleep(0.5)
        raise ArmCheckError(f"the agent's HTTP API was not ready within {timeout:.0f} s:\n{self.log_tail()}")


class Load(threading.Thread):
    """Single-digit requests back to back from the host while a hot swap happens."""

    def __init__(self, agent: EmulatedAgent, pixels: np.ndarray) -> None:
        super().__init__(name="load", daemon=True)
        self.agent, self.pixels = agent, pixels
        self.stop_flag = threading.Event()
        self.versions: dict[str, int] = {}
        self.failures: list[str] = []

    def run(self) -> None:
        i = 0
        while not self.stop_flag.is_set():
            try:
                status, body = self.agent.infer("digits", "pixels", self.pixels[i % len(self.pixels)][None])
            except OSError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if status == 200:
                version = str(body.get("model_version"))
                self.versions[version] = self.versions.get(version, 0) + 1
            else:
                self.failures.append(f"HTTP {status}: {str(body)[:200]}")
            i += 1

    def finish(self) -> None:
        self.stop_flag.set()
        self.join(120)


def _accuracy(agent: EmulatedAgent, pixels: np.ndarray, labels: np.ndarray) -> tuple[str, float, np.ndarray]:
    parts, version = [], ""
    for start in range(0, len(pixels), 100):
        version, logits = agent.output("digits", "pixels", pixels[start : start + 100], "logits")
        parts.append(logits)
    logits = np.concatenate(parts)
    return version, float((logits.argmax(1) == labels).mean()), logits


def _deploy(
    fleet: FleetServer, agent: EmulatedAgent, variants: Variants, model: str, version: int
) -> tuple[str, dict[str, Any]]:
    build = variants.builds.get_build(model, version, PROFILE)
    if build is None:
        raise ArmCheckError(f"no build of {model} v{version} for {PROFILE}")
    mark = fleet.event_count(agent.device_id)
    fleet.deploy(
        agent.device_id,
        build.path.read_bytes(),
        ModelRef(model, version),
        runtime=build.runtime,
        health=build.health,
        chunk_size=build.chunk_size,
        compression=build.compression,
        variant=build.variant,
    )
    event = fleet.wait_event(
        agent.device_id,
        lambda e: e.kind in ("lifecycle.committed", "lifecycle.rolled_back", "lifecycle.failed"),
        after=mark,
        timeout=EMULATED_TIMEOUT,
    )
    expect(
        event.kind == "lifecycle.committed",
        f"{model} v{version}: {event.kind}: {event.message} {event.data}\n{agent.log_tail()}",
    )
    fleet.wait_state(
        agent.device_id,
        lambda s: (
            s.lifecycle == "idle" and s.active is not None and (s.active.name, s.active.version) == (model, version)
        ),
        timeout=EMULATED_TIMEOUT,
    )
    return build.variant, dict(event.data)


def run_scenario(root: Path, steps: Steps, host_work: Path) -> dict[str, Any]:
    """Run every step; raises on the first failure (after stopping the agent, server and broker)."""
    results: dict[str, Any] = {}
    device_id = f"rpi5-emu-{secrets.token_hex(3)}"
    agent = EmulatedAgent(root, device_id)
    broker: MosquittoBroker | None = None
    fleet: FleetServer | None = None
    variants: Variants | None = None
    try:
        with steps.step("host: build raspberry-pi-5 variants") as info:
            variants = build_variants(host_work / "variants")
            acc, names = variants.host_accuracy, variants.variant_names
            info["detail"] = (
                f"{variants.source}: digits v1 {names[('digits', 1)]} {acc[1]:.3f}, "
                f"v2 {names[('digits', 2)]} {acc[2]:.3f}, selfie {names[('selfie', 1)]}"
            )

        with steps.step("host: mosquitto (TLS, passwords, ACL) + server") as info:
            tls = generate_tls(host_work / "tls")
            users = {SERVER_USER: secrets.token_urlsafe(16), device_id: secrets.token_urlsafe(16)}
            broker = MosquittoBroker(workdir=host_work / "mosquitto", security=BrokerSecurity(tls=tls, users=users))
            broker.start()
            fleet = FleetServer(
                broker.host, broker.port, username=SERVER_USER, password=users[SERVER_USER], ca_cert=tls.ca_cert
            )
            info["detail"] = broker.url

        with steps.step("emulated: edgefleet-agent init") as info:
            pub_file = fleet.write_public_key(host_work / "server.pub")
            printed = agent.init(
                server_pub=pub_file.read_bytes(),
                ca_cert=tls.ca_cert.read_bytes(),
                broker_port=broker.port,
                password=users[device_id],
            )
            info["detail"] = f"{device_id}, key {printed[:12]}..."

        with steps.step("emulated: agent start, enroll request, approval") as info:
            agent.start()
            fleet.wait_for(lambda: bool(fleet.log(device_id).enroll_requests), timeout=EMULATED_TIMEOUT)
            request = fleet.log(device_id).enroll_requests[0]
            expect(
                base64.b64encode(request.public_key).decode() == printed,
                "the enroll request's key is not the one init printed",
            )
            expect(
                not (request.arch != "aarch64" or request.profile != PROFILE),
                f"enroll request says arch={request.arch!r} profile={request.profile!r}",
            )
            fleet.enroll(device_id, X25519PublicKey.from_public_bytes(request.public_key))
            fleet.wait_state(device_id, lambda s: s.online and s.lifecycle == "idle", timeout=EMULATED_TIMEOUT)
            info["detail"] = f"arch {request.arch}, agent {request.agent_version}"

        pixels, labels = variants.digits_eval
        with steps.step("deploy digits v1 fp32 (encrypted, signed) + serve") as info:
            variant, _ = _deploy(fleet, agent, variants, "digits", 1)
            agent.wait_ready()
            version, accuracy, logits = _accuracy(agent, pixels, labels)
            drift = float(np.abs(logits - variants.host_logits[1]).max())
            expect(
                not (version != "1" or abs(accuracy - variants.host_accuracy[1]) > 0.004 or drift > 1e-3),
                f"v{version}: accuracy {accuracy:.3f} (host {variants.host_accuracy[1]:.3f}), "
                f"max |logit diff| {drift:.2e}",
            )
            results["accuracy_fp32"] = accuracy
            info["detail"] = (
                f"{variant}; HTTP accuracy {accuracy:.3f} on {len(labels)} digits, max |dlogit| {drift:.1e}"
            )

        with steps.step("hot-swap to digits v2 int8 under load") as info:
            load = Load(agent, pixels)
            load.start()
            try:
                variant, _ = _deploy(fleet, agent, variants, "digits", 2)
                deadline = time.monotonic() + 60
                while load.versions.get("2", 0) < 3 and time.monotonic() < deadline and not load.failures:
                    time.sleep(0.2)
            finally:
                load.finish()
            expect(not load.failures, f"{len(load.failures)} requests failed during the swap: {load.failures[:3]}")
            expect(
                not (not load.versions.get("1") or not load.versions.get("2")),
                f"the load did not see both versions: {load.versions}",
            )
            served = sum(load.versions.values())
            results["swap_requests"] = served
            info["detail"] = f"{variant}; {served} requests during the swap (v1 {load.versions['1']}, "
            info["detail"] += f"v2 {load.versions['2']}), 0 failed"

        with steps.step("serve v2 int8: accuracy over HTTP") as info:
            version, accuracy, logits = _accuracy(agent, pixels, labels)
            host = variants.host_accuracy[2]
            agree = float((logits.argmax(1) == variants.host_logits[2].argmax(1)).mean())
            expect(
                not (version != "2" or abs(accuracy - host) > 0.01),
                f"v{version}: aarch64 accuracy {accuracy:.3f} vs host {host:.3f}",
            )
            results["accuracy_int8"] = accuracy
            info["detail"] = f"aarch64 {accuracy:.3f} vs x86_64 {host:.3f}; argmax agreement {agree:.3f}"

        with steps.step("telemetry reports arch aarch64") as info:
            mark = len(fleet.log(device_id).telemetry)
            fleet.wait_for(lambda: len(fleet.log(device_id).telemetry) > mark, timeout=EMULATED_TIMEOUT)
            t = fleet.log(device_id).telemetry[-1]
            expect(t.arch == "aarch64", f"telemetry arch is {t.arch!r}")
            expect(
                not (t.model is None or (t.model.name, t.model.version) != ("digits", 2)),
                f"telemetry model is {t.model}",
            )
            results["telemetry"] = {"arch": t.arch, "cpu_percent": t.cpu_percent, "rss_bytes": t.rss_bytes}
            info["detail"] = f"arch {t.arch}, model digits v2, {t.requests} requests, rss {t.rss_bytes >> 20} MiB"

        with steps.step("rollback command -> v1") as info:
            fleet.command(device_id, "rollback")
            fleet.wait_state(
                device_id,
                lambda s: s.lifecycle == "idle" and s.active is not None and s.active.version == 1,
                timeout=EMULATED_TIMEOUT,
            )
            version, logits = agent.output("digits", "pixels", pixels[:50], "logits")
            expect(
                not (version != "1" or float(np.abs(logits - variants.host_logits[1][:50]).max()) > 1e-3),
                f"after the rollback the API serves v{version}",
            )
            info["detail"] = f"serves v{version} again, kept {fleet.log(device_id).states[-1].kept}"

        with steps.step("deploy selfie v1 .tflite (LiteRT) + serve") as info:
            variant, _ = _deploy(fleet, agent, variants, "selfie", 1)
            frame = variants.selfie_frames[0][None]
            _, mask = agent.output("selfie", "input_1", frame, "activation_10")
            ours, host = mask > 0.5, variants.host_selfie_mask > 0.5
            union = int((ours | host).sum())
            iou = float((ours & host).sum() / union) if union else 1.0
            expect(iou >= 0.98, f"LiteRT mask IoU vs host {iou:.3f}")
            results["selfie_iou"] = iou
            info["detail"] = f"{variant}; mask IoU vs x86_64 LiteRT {iou:.4f}"

        with steps.step("agent stops cleanly (SIGTERM)") as info:
            code = agent.stop()
            expect(code == 0, f"agent exited with {code}:\n{agent.log_tail()}")
            info["detail"] = "exit 0"
    except BaseException:
        log(f"emulated agent log (tail):\n{agent.log_tail()}")
        raise
    else:
        return results
    finally:
        agent.kill()
        if fleet is not None:
            fleet.close()
        if broker is not None:
            broker.close()
        if variants is not None:
            variants.builds.close()
        shutil.rmtree(agent.work, ignore_errors=True)
