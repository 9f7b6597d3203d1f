"""What a 3-node NATS cluster (JetStream + its MQTT listener, Debian's nats-server) does with the four things
edgefleet's protocol depends on, across nodes. docs/scale.md, "Clustered brokers".

    .venv/bin/python scripts/eval_nats_mqtt.py [--json PATH]

Starts three private nats-server processes on free loopback ports (cluster routes, JetStream in a temp dir,
``mqtt { stream_replicas: 3 }``, one user per login with the per-device permissions edgefleet's ACL needs,
written as NATS subjects), then checks with paho-mqtt, each check one line of the JSON result:

  qos1_across_nodes         a device's QoS 1 event published on node 2 reaches the server subscribed on node 1
  retained_across_nodes     a retained desired state published on node 1 reaches the device subscribing on node 3
  retained_after_node_loss  ... and still after node 1 (where it was published) is killed
  session_across_nodes      a persistent session made on node 2 resumes on node 3 with the QoS 1 command queued
  will_retained             an abruptly lost device's retained Last Will reaches the server on another node, kept
  acl_publish_other_device  a device publishing on another device's up-topic is refused (the server never sees it)
  acl_subscribe_other       a device subscribing to another device's down-topic is refused (SUBACK failure)
  client_id_bound           a login cannot take another device's client id (mosquitto: use_username_as_clientid)
  shared_subscription       ``$share/edgefleet-server/...`` splits device traffic between two server sessions
  dotted_device_id          a device id with '.' (allowed by the protocol) works end to end
  acl_template              whether one rule covers every device (mosquitto's ``pattern ... %u``): False = one
                            permission block per device in the config, every node reloaded on every enrollment
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.processes import stop_gently

R = "edgefleet/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subject(topic: str) -> str:
    """NATS's MQTT topic -> subject mapping for what we need: '/' -> '.', '.' -> '//' ."""
    return topic.replace(".", "//").replace("/", ".").replace("..", "./.") if "." in topic else topic.replace("/", ".")


def device_permissions(device: str) -> dict[str, Any]:
    d = device.replace(".", "//")
    return {
        "publish": {"allow": [f"{R.replace('/', '.')}.dev.{d}.up.{leaf}" for leaf in
                              ("state", "telemetry", "event", "chunkreq", "enroll")]},
        # $MQTT.sub.>: the JetStream delivery subjects behind a QoS 1 subscription; ``down`` itself: MQTT's
        # ``down/#`` also matches the parent, and NATS subscribes both (each refused without it: measured)
        "subscribe": {"allow": [f"{R.replace('/', '.')}.dev.{d}.down.>", f"{R.replace('/', '.')}.dev.{d}.down",
                                f"{R.replace('/', '.')}.art.*", "$MQTT.sub.>"]},
    }


USERS = {"edgefleet-server": "srv-pw", "dev-a": "a-pw", "dev-b": "b-pw", "cam.front": "c-pw"}


def config(i: int, ports: list[dict[str, int]], store: Path) -> str:
    users = []
    for user, pw in USERS.items():
        perms = {"publish": ">", "subscribe": ">"} if user == "edgefleet-server" else device_permissions(user)
        users.append({"user": user, "password": pw, "permissions": perms})
    routes = [f"nats-route://127.0.0.1:{p['cluster']}" for j, p in enumerate(ports) if j != i]
    return "\n".join([
        f"server_name: n{i + 1}",
        f"listen: 127.0.0.1:{ports[i]['client']}",
        "max_payload: 8MB",
        f"jetstream {{ store_dir: {json.dumps(str(store / f'n{i + 1}'))}, max_mem: 64MB, max_file: 512MB }}",
        f"cluster {{ name: ef, listen: 127.0.0.1:{ports[i]['cluster']}, routes: {json.dumps(routes)} }}",
        f"mqtt {{ listen: 127.0.0.1:{ports[i]['mqtt']}, stream_replicas: 3 }}",
        f"authorization {{ users: {json.dumps(users)} }}",
    ]) + "\n"


class Client:
    def __init__(self, port: int, user: str, *, client_id: str | None = None, clean: bool = True,
                 will: tuple[str, bytes] | None = None) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.connected: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or user, clean_session=clean,
                             protocol=mqtt.MQTTv311)
        self.c.username_pw_set(user, USERS[user])
        if will:
            self.c.will_set(will[0], will[1], qos=1, retain=True)
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(list(rcs))
        self.c.on_connect = lambda c, u, flags, rc, p: self.connected.put((rc, flags))
        self.c.connect("127.0.0.1", port, keepalive=10)
        self.c.loop_start()
        self.rc, self.flags = self.connected.get(timeout=15)

    def sub(self, topic: str) -> list[Any]:
        self.c.subscribe(topic, 1)
        return self.subacks.get(timeout=15)

    def pub(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def get(self, want: bytes, timeout: float = 10.0) -> mqtt.MQTTMessage | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with contextlib.suppress(queue.Empty):
                m = self.messages.get(timeout=0.2)
                if m.payload == want:
                    return m
        return None

    def close(self, *, abrupt: bool = False) -> None:
        if abrupt:
            sock = self.c.socket()
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]  # no DISCONNECT: the broker sends the Will
            time.sleep(0.5)
            self.c.loop_stop()
            return
        self.c.disconnect()
        self.c.loop_stop()


def run(work: Path) -> dict[str, Any]:
    binary = shutil.which("nats-server")
    if not binary:
        raise SystemExit("nats-server is not installed (apt-get install nats-server)")
    ports = [{"client": free_port(), "cluster": free_port(), "mqtt": free_port()} for _ in range(3)]
    procs = []
    for i in range(3):
        conf = work / f"n{i + 1}.conf"
        conf.write_text(config(i, ports, work / "js"))
        procs.append(subprocess.Popen([binary, "-c", str(conf)], stdout=(work / f"n{i + 1}.log").open("wb"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    out: dict[str, Any] = {"nats_server": subprocess.run([binary, "--version"], capture_output=True, text=True,
                                                          check=False).stdout.strip()}
    mq = [p["mqtt"] for p in ports]
    try:
        _wait_mqtt(mq)
        srv = Client(mq[0], "edgefleet-server", client_id="srv-1", clean=False)
        srv.sub(f"{R}/dev/+/up/#")
        # QoS 1 across nodes
        a = Client(mq[1], "dev-a", clean=False)
        a.pub(f"{R}/dev/dev-a/up/event", b"ev-1")
        out["qos1_across_nodes"] = srv.get(b"ev-1") is not None
        # retained across nodes, and after losing the node it was published on
        srv.pub(f"{R}/dev/dev-b/down/desired", b"desired-b", retain=True)
        b = Client(mq[2], "dev-b")
        b.sub(f"{R}/dev/dev-b/down/#")
        out["retained_across_nodes"] = b.get(b"desired-b") is not None
        b.close()
        # persistent session made on node 2, resumed on node 3 with what was queued meanwhile
        a.sub(f"{R}/dev/dev-a/down/#")
        a.close()
        srv.pub(f"{R}/dev/dev-a/down/cmd", b"cmd-a")
        a = Client(mq[2], "dev-a", clean=False)
        out["session_across_nodes"] = bool(getattr(a.flags, "session_present", False)) and a.get(b"cmd-a") is not None
        # ACL: another device's up-topic, another device's down-topic, another device's client id
        a.pub(f"{R}/dev/dev-b/up/event", b"forged")
        out["acl_publish_other_device"] = srv.get(b"forged", timeout=3) is None
        with contextlib.suppress(Exception):
            a = Client(mq[2], "dev-a", clean=False) if not a.c.is_connected() else a
        rcs = a.sub(f"{R}/dev/dev-b/down/desired")
        out["acl_subscribe_other"] = bool(rcs) and all(getattr(rc, "is_failure", rc == 128) for rc in rcs)
        try:
            thief = Client(mq[0], "dev-a", client_id="dev-b")
            out["client_id_bound"] = getattr(thief.rc, "is_failure", False)
            thief.close()
        except Exception as exc:
            out["client_id_bound"] = f"refused: {exc}"
        # shared subscription between two server sessions
        srv2 = Client(mq[1], "edgefleet-server", client_id="srv-2", clean=False)
        rcs1 = srv.sub(f"$share/g/{R}/dev/+/up/telemetry")
        rcs2 = srv2.sub(f"$share/g/{R}/dev/+/up/telemetry")
        a2 = Client(mq[0], "dev-a", client_id="dev-a")
        for k in range(10):
            a2.pub(f"{R}/dev/dev-a/up/telemetry", f"t{k}".encode())
        time.sleep(2)
        got1 = sum(1 for m in list(srv.messages.queue) if m.payload.startswith(b"t"))
        got2 = sum(1 for m in list(srv2.messages.queue) if m.payload.startswith(b"t"))
        out["shared_subscription"] = {"suback": [str(rcs1), str(rcs2)], "server_1": got1, "server_2": got2,
                                      "split": got1 > 0 and got2 > 0 and got1 + got2 == 10}
        # a Will, retained, seen on another node; then a device id with a dot
        for device, key in (("dev-b", "will_retained"), ("cam.front", "dotted_device_id")):
            try:
                w = Client(mq[2], device, will=(f"{R}/dev/{device}/up/state", b"offline-will-" + device.encode()))
                w.pub(f"{R}/dev/{device}/up/state", b"online-birth-" + device.encode(), retain=True)
                birth = srv.get(b"online-birth-" + device.encode()) is not None
                w.close(abrupt=True)
                will = srv.get(b"offline-will-" + device.encode(), timeout=15) is not None
                out[key] = birth and will
            except Exception as exc:
                out[key] = f"failed: {type(exc).__name__} {exc}"
        # retained after the publishing node is gone
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        lost_at = time.monotonic()
        out["retained_after_node_loss"] = False
        while time.monotonic() - lost_at < 45 and not out["retained_after_node_loss"]:  # JetStream re-elects leaders
            with contextlib.suppress(Exception):
                b = Client(mq[2], "dev-b")
                b.sub(f"{R}/dev/dev-b/down/#")
                out["retained_after_node_loss"] = b.get(b"desired-b", timeout=5) is not None
                b.close()
        out["retained_after_node_loss_s"] = round(time.monotonic() - lost_at, 1)
        out["acl_template"] = False  # static config: permissions list every user; no %u / per-username substitution
    finally:
        for p in procs:
            stop_gently(p, 10)
    return out


def _wait_mqtt(ports: list[int], timeout: float = 60.0) -> None:
    """Until every node accepts an MQTT login (JetStream needs its cluster and meta leader first)."""
    end = time.monotonic() + timeout
    for port in ports:
        while True:
            try:
                c = Client(port, "edgefleet-server", client_id=f"probe-{port}")
                c.close()
                if not getattr(c.rc, "is_failure", False):
                    break
            except Exception:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"nats MQTT on port {port} did not accept a login")
            time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="eval-nats-") as tmp:
        result = run(Path(tmp))
        text = json.dumps(result, indent=2)
        print(text)
        if args.json:
            args.json.write_text(text + "\n")
        for log in sorted(Path(tmp).glob("n*.log")):
            errors = [line for line in log.read_text(errors="replace").splitlines() if "[ERR]" in line][:5]
            if errors:
                print(f"{log.name}: " + " | ".join(errors), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
