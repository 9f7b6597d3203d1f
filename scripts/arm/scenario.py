"""The end-to-end scenario: the agent inside the emulated aarch64 root filesystem, everything else on the host.

Host: mosquitto with TLS, per-client passwords and the device ACL (``server.broker.MosquittoBroker``), the
real control plane (``edgefleet server run``, through ``tests.support.servers.process``, driven over its HTTP
API), and the ``raspberry-pi-5`` builds in its catalog (``scripts.arm.variants``: ``edgefleet model add`` +
``edgefleet build``). Emulated: ``edgefleet-agent init`` and
``edgefleet-agent run`` under qemu-aarch64 in the chroot, which shares the host's network, so the agent
reaches the broker on 127.0.0.1 and the host reaches the agent's local HTTP API.

Steps: enrol (the device's enroll request reaches the server with its fingerprint and ``arch``; the operator
approves the fingerprint ``init`` printed), deploy digits:1 (fp32), hot-swap to digits:2 (int8) under a
stream of requests (none may fail), check the device's telemetry says ``aarch64``, ``rollback`` to digits:1,
deploy the LiteRT selfie model, probe-build digits:1 on the device (``edgefleet build --probe``: both
candidates timed off the serving path while selfie serves; figures marked emulated), stop cleanly.

Emulation is ~50x slower than the board: ``lifecycle.latency_scale`` in the agent's config scales the
profile's latency budget there (the builds keep the real 200 ms of raspberry-pi-5).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from agent.protocol.messages import Telemetry as TelemetryMessage
from agent.protocol.messages import decode_up
from agent.protocol.topics import Channel, device_topic
from scripts.arm.rootfs import QEMU_CPU, VENV, ArmCheckError, chroot, log
from scripts.arm.steps import Steps
from scripts.arm.variants import PROBATION_S, PROFILE, build_variants
from server.broker import SERVER_USER, BrokerSecurity, MosquittoBroker, acl_text, free_port, generate_tls
from tests.support.devices.agent_process import write_config
from tests.support.servers.process import ServerProcess

#: The agent's settings for an emulated board (each a documented config knob; the defaults stay the real ones).
EMULATION: dict[str, dict[str, Any]] = {
    "lifecycle": {"latency_scale": 50.0, "probation_check_s": 0.5},
    "telemetry": {"interval_s": 2.0},
    "transfer": {"chunk_timeout_s": 5.0, "chunk_timeout_max_s": 20.0, "progress_interval_s": 2.0},
    "broker": {"reconnect_min_s": 0.5, "reconnect_max_s": 2.0},
    "inference": {"intra_op_threads": 1},
    "log": {"format": "json", "level": "info"},
}
EMULATED_TIMEOUT = 300.0
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
#: a read-only broker login for the host-side telemetry observer (not the server's: one login, one session)
OBSERVER = "arm-check-observer"


def expect(ok: bool, message: str) -> None:
    if not ok:
        raise ArmCheckError(message)


class EmulatedAgent:
    """``edgefleet-agent`` in the chroot: init, run (a real process: SIGTERM stops it, SIGKILL on timeout)."""

    def __init__(self, root: Path, device_id: str) -> None:
        self.root = root
        self.device_id = device_id
        self.inside = f"/tmp/edgefleet-arm-{secrets.token_hex(4)}"  # this run's directory inside the rootfs
        self.work = root / self.inside.lstrip("/")
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        self.http_port = free_port()
        self.config_in = f"{self.inside}/etc/agent.toml"
        self.log_path = self.work / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def host_path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def init(self, *, server_pub: bytes, ca_cert: bytes, broker_port: int, password: str) -> str:
        """Run ``edgefleet-agent init`` in the chroot; returns the key fingerprint it printed (for the operator)."""
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
                f"{self.inside}/server.pub",
                "--broker",
                f"127.0.0.1:{broker_port}",
                "--tls",
                "--ca-cert",
                f"{self.inside}/ca.crt",
                "--username",
                self.device_id,
                "--password-file",
                f"{self.inside}/pw",
                "--config",
                self.config_in,
                "--store-dir",
                f"{self.inside}/store",
                "--http-port",
                str(self.http_port),
            ],
            what="edgefleet-agent init (emulated)",
            timeout=EMULATED_TIMEOUT,
        )
        (self.work / "pw").unlink()
        public = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("fingerprint")), "")
        if not public:
            raise ArmCheckError(f"edgefleet-agent init printed no fingerprint:\n{out}")
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


class Telemetry(threading.Thread):
    """The device's own telemetry messages, read off the broker by a host client with a read-only login."""

    def __init__(self, port: int, ca_cert: Path, password: str, device_id: str) -> None:
        super().__init__(name="telemetry", daemon=True)
        import paho.mqtt.client as mqtt  # noqa: PLC0415
        from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

        self.messages: list[TelemetryMessage] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"arm-check-{secrets.token_hex(3)}")
        self.client.username_pw_set(OBSERVER, password)
        self.client.tls_set(ca_certs=str(ca_cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        topic = device_topic(device_id, Channel.TELEMETRY)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=0)
        self.client.on_message = lambda _c, _u, msg: self._on(bytes(msg.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on(self, payload: bytes) -> None:
        with contextlib.suppress(Exception):
            message = decode_up(payload, "telemetry")
            if isinstance(message, TelemetryMessage):
                self.messages.append(message)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Server:
    """``edgefleet server run`` (tests.support.servers.process) on TLS, used through its HTTP API."""

    def __init__(self, process: ServerProcess, device_id: str) -> None:
        self.process, self.device_id = process, device_id

    def device(self) -> dict[str, Any]:
        rows = {d["device_id"]: d for d in self.process.call("list_devices")}
        return dict(rows.get(self.device_id) or {})

    def wait(self, what: str, condition: Any, timeout: float = EMULATED_TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = condition()
            if last:
                return last
            time.sleep(0.3)
        raise ArmCheckError(f"{what}: not within {timeout:.0f} s (last: {last})")

    def deploy(self, agent: EmulatedAgent, ref: str) -> dict[str, Any]:
        """Deploy ``ref`` to the device; wait for the deployment to complete and the device to serve it."""
        body = {"model": ref, "target": f"device:{self.device_id}", "probation_s": PROBATION_S}
        dep = self.process.call("deploy", body=body)
        deployment_id = dep["deployment_id"]

        def finished() -> dict[str, Any] | None:
            agent.alive()
            detail: dict[str, Any] = self.process.call("get_deployment", path={"deployment_id": deployment_id})
            return detail if detail["status"] in ("completed", "failed", "halted") else None

        detail = self.wait(f"deployment of {ref}", finished)
        rows = detail.get("devices", [])
        expect(
            detail["status"] == "completed" and all(r["state"] == "committed" for r in rows),
            f"deployment of {ref} is {detail['status']}: {[(r['state'], r.get('reason')) for r in rows]}\n"
            f"{agent.log_tail()}",
        )
        name, version = ref.split(":")
        self.wait(
            f"{ref} active on the device",
            lambda: self.device().get("active_model") == name and self.device().get("active_version") == int(version),
        )
        return dict(dep)


def _probe(process: ServerProcess, server: Server, device_id: str) -> dict[str, Any]:
    """``edgefleet build digits:1 --profile raspberry-pi-5 --probe device:ID`` (the CLI over the server's API):
    the emulated agent fetches both candidates, times them off its serving path (selfie keeps serving) and
    reports; the build is re-chosen with those figures. Marked emulated: the device says ``aarch64`` and the
    figures are qemu's (~50x a board), never board latencies."""
    built = process.cli("build", "digits:1", "--profile", PROFILE, "--probe", f"device:{device_id}",
                        "--probe-timeout", f"{EMULATED_TIMEOUT:.0f}", "--recipe", "fp32", "--recipe", "fp16-weights",
                        "--latency-runs", "3", "--no-pruning", "--no-fallback", "--json")
    (row,) = json.loads(built.stdout)
    probe = row.get("probe") or {}
    expect(probe.get("answered") == [device_id] and not probe.get("missing") and not probe.get("failed"),
           f"probe answered by {probe.get('answered')}, missing {probe.get('missing')}, failed {probe.get('failed')}")
    measured = dict(probe.get("measured_p50_ms") or {})
    expect(set(measured) == set(probe.get("variants") or ()) and all(v > 0 for v in measured.values()),
           f"measured {measured} for variants {probe.get('variants')}")
    arch = server.device().get("arch") or process.call("get_device", path={"device_id": device_id}).get("arch")
    expect(arch == "aarch64", f"the probed device's arch is {arch!r}")
    shown = json.loads(process.cli("model", "show", "digits:1", "--json").stdout)
    figures = [f for f in shown.get("measured", []) if f["profile"] == PROFILE and f["variant"] in measured]
    expect(len(figures) >= len(measured), f"model show lists {figures}")
    return {"emulated": True, "arch": arch, "blind_variant": row["blind_variant"], "variant": row["variant"],
            "measured_p50_ms": measured, "seconds": probe.get("seconds", 0.0)}


def run_scenario(root: Path, steps: Steps, host_work: Path) -> dict[str, Any]:
    """Run every step; raises on the first failure (after stopping the agent, server and broker)."""
    results: dict[str, Any] = {}
    device_id = f"rpi5-emu-{secrets.token_hex(3)}"
    agent = EmulatedAgent(root, device_id)
    broker: MosquittoBroker | None = None
    process: ServerProcess | None = None
    telemetry: Telemetry | None = None
    home = host_work / "server-home"
    try:
        with steps.step("host: edgefleet model add + build for raspberry-pi-5") as info:
            variants = build_variants(home)
            acc, names = variants.host_accuracy, variants.variant_names
            info["detail"] = (
                f"digits v1 {names[('digits', 1)]} {acc[1]:.3f}, v2 {names[('digits', 2)]} {acc[2]:.3f}, "
                f"selfie v1 {names[('selfie', 1)]}"
            )

        with steps.step("host: mosquitto (TLS, passwords, ACL) + edgefleet server run") as info:
            tls = generate_tls(host_work / "tls")
            users = {SERVER_USER: secrets.token_urlsafe(16), device_id: secrets.token_urlsafe(16),
                     OBSERVER: secrets.token_urlsafe(16)}
            # the observer has a login of its own: client id = username, so sharing the server's would kick it off
            acl = acl_text() + f"\nuser {OBSERVER}\ntopic read edgefleet/v1/#\n"
            broker = MosquittoBroker(workdir=host_work / "mosquitto",
                                     security=BrokerSecurity(tls=tls, users=users, acl=acl))
            broker.start()
            (home / "mqtt-password").write_text(users[SERVER_USER] + "\n")
            (home / "mqtt-password").chmod(0o600)
            broker_settings = {
                "url": f"mqtts://127.0.0.1:{broker.port}",
                "username": SERVER_USER,
                "password_file": "mqtt-password",
                "ca_cert": str(tls.ca_cert),
            }
            process = ServerProcess(home, broker, [], settings={"broker": broker_settings})
            process.start()
            server = Server(process, device_id)
            info["detail"] = f"{broker.url}, API {process.api_url}"

        with steps.step("emulated: edgefleet-agent init") as info:
            printed = agent.init(
                server_pub=process.public_key_pem,
                ca_cert=tls.ca_cert.read_bytes(),
                broker_port=broker.port,
                password=users[device_id],
            )
            info["detail"] = f"{device_id}, fingerprint {printed}"

        with steps.step("emulated: agent start, enroll request, operator approval") as info:
            agent.start()

            def pending() -> dict[str, Any] | None:
                agent.alive()
                rows = {r["device_id"]: r for r in process.call("pending_enrollments")}
                return rows.get(device_id)

            request = server.wait("enroll request", pending)
            expect(request.get("fingerprint") == printed, f"enroll request fingerprint {request.get('fingerprint')}")
            expect(request.get("arch") == "aarch64", f"enroll request arch {request.get('arch')!r}")
            process.call(
                "approve_device", path={"device_id": device_id}, body={"fingerprint": printed, "profile": PROFILE}
            )
            # no wait for "online": the birth state the agent sent before approval was refused (unknown device);
            # its next state report (the deployment below) is what the server will see first
            server.wait("device registered", lambda: server.device().get("status") == "active")
            info["detail"] = f"arch {request['arch']}, profile {PROFILE}, approved by fingerprint"

        pixels, labels = variants.digits_eval
        with steps.step("deploy digits:1 fp32 (encrypted, signed) + serve") as info:
            server.deploy(agent, "digits:1")
            agent.wait_ready()
            version, accuracy, logits = _accuracy(agent, pixels, labels)
            drift = float(np.abs(logits - variants.host_logits[1]).max())
            expect(
                version == "1" and abs(accuracy - variants.host_accuracy[1]) <= 0.004 and drift <= 1e-3,
                f"v{version}: accuracy {accuracy:.3f} (host {variants.host_accuracy[1]:.3f}), max |dlogit| {drift:.2e}",
            )
            results["accuracy_fp32"] = accuracy
            info["detail"] = f"HTTP accuracy {accuracy:.3f} on {len(labels)} digits, max |dlogit| {drift:.1e}"

        with steps.step("hot-swap to digits:2 int8 under load") as info:
            load = Load(agent, pixels)
            load.start()
            try:
                server.deploy(agent, "digits:2")
                deadline = time.monotonic() + 60
                while load.versions.get("2", 0) < 3 and time.monotonic() < deadline and not load.failures:
                    time.sleep(0.2)
            finally:
                load.finish()
            expect(not load.failures, f"{len(load.failures)} requests failed during the swap: {load.failures[:3]}")
            expect(bool(load.versions.get("1") and load.versions.get("2")), f"versions seen: {load.versions}")
            served = sum(load.versions.values())
            results["swap_requests"] = served
            info["detail"] = (
                f"{server.device().get('active_variant')}; {served} requests during the swap "
                f"(v1 {load.versions['1']}, v2 {load.versions['2']}), 0 failed"
            )

        with steps.step("serve digits:2 int8: accuracy over HTTP") as info:
            version, accuracy, logits = _accuracy(agent, pixels, labels)
            host = variants.host_accuracy[2]
            agree = float((logits.argmax(1) == variants.host_logits[2].argmax(1)).mean())
            expect(version == "2" and abs(accuracy - host) <= 0.01, f"v{version}: {accuracy:.3f} vs host {host:.3f}")
            results["accuracy_int8"] = accuracy
            info["detail"] = f"aarch64 {accuracy:.3f} vs x86_64 {host:.3f}; argmax agreement {agree:.3f}"

        with steps.step("telemetry: the device reports arch aarch64, the server ingests it") as info:
            telemetry = Telemetry(broker.port, tls.ca_cert, users[OBSERVER], device_id)
            telemetry.start()
            t = server.wait("a telemetry message", lambda: telemetry.messages[-1] if telemetry.messages else None)
            expect(t.arch == "aarch64", f"telemetry arch is {t.arch!r}")
            expect(t.model is not None and (t.model.name, t.model.version) == ("digits", 2), f"model {t.model}")
            series = server.wait(
                "telemetry ingested by the server",
                lambda: process.call("get_device", path={"device_id": device_id}).get("telemetry"),
            )
            results["telemetry"] = {"arch": t.arch, "cpu_percent": t.cpu_percent, "rss_bytes": t.rss_bytes}
            info["detail"] = (
                f"arch {t.arch}, model digits v2, rss {t.rss_bytes >> 20} MiB; server telemetry rows: {len(series)}"
            )

        with steps.step("edgefleet rollback -> digits:1") as info:
            process.call("rollback", body={"target": f"device:{device_id}", "model": "digits", "version": 1})
            server.wait("v1 active again", lambda: server.device().get("active_version") == 1)
            version, logits = agent.output("digits", "pixels", pixels[:50], "logits")
            expect(
                version == "1" and float(np.abs(logits - variants.host_logits[1][:50]).max()) <= 1e-3,
                f"after the rollback the API serves v{version}",
            )
            info["detail"] = f"serves v{version} again, kept {server.device().get('kept')}"

        with steps.step("deploy selfie:1 .tflite (LiteRT) + serve") as info:
            server.deploy(agent, "selfie:1")
            frame = variants.selfie_frames[0][None]
            _, mask = agent.output("selfie", "input_1", frame, "activation_10")
            ours, host_mask = mask > 0.5, variants.host_selfie_mask > 0.5
            union = int((ours | host_mask).sum())
            iou = float((ours & host_mask).sum() / union) if union else 1.0
            expect(iou >= 0.98, f"LiteRT mask IoU vs host {iou:.3f}")
            results["selfie_iou"] = iou
            info["detail"] = f"{names[('selfie', 1)]}; mask IoU vs x86_64 LiteRT {iou:.4f}"

        with steps.step("edgefleet build digits:1 --probe: timed on the emulated device") as info:
            results["probe"] = _probe(process, server, device_id)
            p = results["probe"]
            info["detail"] = (f"blind {p['blind_variant']} -> {p['variant']}; EMULATED aarch64 p50 "
                              + ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(p["measured_p50_ms"].items()))
                              + f" ({p['seconds']:.0f} s; qemu, not board figures)")

        with steps.step("agent stops cleanly (SIGTERM)") as info:
            code = agent.stop()
            expect(code == 0, f"agent exited with {code}:\n{agent.log_tail()}")
            info["detail"] = "exit 0"
    except BaseException:
        log(f"emulated agent log (tail):\n{agent.log_tail()}")
        if process is not None:
            log(f"server log (tail):\n{process.log_text()[-2000:]}")
        raise
    else:
        return results
    finally:
        agent.kill()
        if telemetry is not None:
            telemetry.close()
        if process is not None:
            process.stop()
        if broker is not None:
            broker.close()
        shutil.rmtree(agent.work, ignore_errors=True)
