"""Shared fixtures: a real mosquitto on a free loopback port, plain and secured; PostgreSQL.

Tests never use a public broker and never reach outside loopback.

``EDGEFLEET_TEST_REGISTRY=postgresql`` (scripts/test's second pass) runs every test on a registry in
PostgreSQL: one private server for the session (``tests/support/postgres.py``) and
``$EDGEFLEET_REGISTRY_URL`` naming a database per server home, so every registry a test opens
(in-process servers, server processes, the CLI) is in PostgreSQL and as fresh as a new registry.db.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.broker import SERVER_USER, BrokerSecurity, MosquittoBroker, TLSFiles, generate_tls
from server.config import REGISTRY_URL_ENV
from server.registry.db import HOME_PLACEHOLDER
from tests.support.mqtt import MqttTestClient
from tests.support.postgres import PostgresServer

#: the agent fixtures (``models``, ``fleet``, ``agent_factory``, ``agent_v1``, ``agent_v2``) for every test module;
#: they build ONNX models, so not where onnx is absent (scripts/py310_check: the agent's unit tests on Python 3.10)
pytest_plugins = ("tests.support.devices.fixtures",) if importlib.util.find_spec("onnx") else ()

TEST_REGISTRY = os.environ.get("EDGEFLEET_TEST_REGISTRY", "sqlite")
if TEST_REGISTRY not in ("sqlite", "postgresql"):
    raise pytest.UsageError(f"EDGEFLEET_TEST_REGISTRY must be sqlite or postgresql, not {TEST_REGISTRY!r}")


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One private PostgreSQL for the session (initdb in a temporary directory, a free loopback port)."""
    with PostgresServer() as pg:
        yield pg


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh database of the test's own (dropped afterwards, connections and all)."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(scope="session", autouse=True)
def _registry_backend(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under EDGEFLEET_TEST_REGISTRY=postgresql every server home's registry is a database of its own on the
    session's PostgreSQL (``{home}`` in the URL: created on first use, as SQLite creates HOME/registry.db)."""
    before = os.environ.pop(REGISTRY_URL_ENV, None)
    if TEST_REGISTRY == "postgresql":
        os.environ[REGISTRY_URL_ENV] = request.getfixturevalue("postgres").url(HOME_PLACEHOLDER)
    yield
    os.environ.pop(REGISTRY_URL_ENV, None)
    if before is not None:
        os.environ[REGISTRY_URL_ENV] = before


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
