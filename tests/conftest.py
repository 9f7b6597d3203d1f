"""Shared fixtures: a real mosquitto on a free loopback port, plain and secured.

Tests never use a public broker and never reach outside loopback.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.broker import SERVER_USER, BrokerSecurity, MosquittoBroker, TLSFiles, generate_tls
from tests.support.mqtt import MqttTestClient


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One private mosquitto for the session; tests keep apart by using their own device ids."""
    with MosquittoBroker(workdir=tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker of the test's own, for tests that restart or kill it (persistence on)."""
    b = MosquittoBroker(workdir=tmp_path / "mosquitto", persistence=True)
    with b:
        yield b


class SecureBrokerFactory:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tls: TLSFiles = generate_tls(tmp / "tls")
        self.brokers: list[MosquittoBroker] = []

    def __call__(self, device_ids: list[str], *, tls: bool = True) -> tuple[MosquittoBroker, dict[str, str]]:
        users = {SERVER_USER: secrets.token_urlsafe(16)} | {d: secrets.token_urlsafe(16) for d in device_ids}
        b = MosquittoBroker(
            workdir=self.tmp / f"mosquitto-{len(self.brokers)}",
            security=BrokerSecurity(tls=self.tls if tls else None, users=users),
        )
        b.start()
        self.brokers.append(b)
        return b, users


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[SecureBrokerFactory]:
    """Factory: ``broker, passwords = secure_broker(["dev-a", "dev-b"])`` gives TLS + users + ACL."""
    factory = SecureBrokerFactory(tmp_path)
    yield factory
    for b in factory.brokers:
        b.close()


@pytest.fixture
def mqtt_client(broker: MosquittoBroker) -> Iterator[Callable[..., MqttTestClient]]:
    clients: list[MqttTestClient] = []

    def make(**kwargs: object) -> MqttTestClient:
        c = MqttTestClient(broker.host, broker.port, **kwargs)  # type: ignore[arg-type]
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()
