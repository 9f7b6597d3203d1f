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
from tests.support.registry_use import REGISTRY_FREE_URL, SCOPE, RegistryReach

#: the agent fixtures (``models``, ``fleet``, ``agent_factory``, ``agent_v1``, ``agent_v2``) for every test module;
#: they build ONNX models, so not where onnx is absent (scripts/py310_check: the agent's unit tests on Python 3.10)
pytest_plugins = ("tests.support.devices.fixtures",) if importlib.util.find_spec("onnx") else ()

TEST_REGISTRY = os.environ.get("EDGEFLEET_TEST_REGISTRY", "sqlite")
if TEST_REGISTRY not in ("sqlite", "postgresql"):
    raise pytest.UsageError(f"EDGEFLEET_TEST_REGISTRY must be sqlite or postgresql, not {TEST_REGISTRY!r}")
#: ``all``: the PostgreSQL pass keeps the registry-free tests of tests/integration and tests/faults too
PG_SELECT_ALL = os.environ.get("EDGEFLEET_TEST_POSTGRESQL", "") == "all"

_REGISTRY_FREE = pytest.StashKey[bool]()
_DESELECTED = pytest.StashKey[list[str]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Classify tests/integration and tests/faults: which can open the registry (tests/support/registry_use.py).
    The PostgreSQL pass deselects the others (they would run exactly as in the SQLite pass); both passes run
    them with a registry URL that cannot be opened, so a wrong classification fails the test."""
    in_scope = [item for item in items if item.nodeid.startswith(SCOPE)]
    if not in_scope:
        return
    reach = RegistryReach()
    for item in in_scope:
        item.stash[_REGISTRY_FREE] = not reach.touches(item)
    if TEST_REGISTRY != "postgresql" or PG_SELECT_ALL:
        return
    free = [item for item in items if item.stash.get(_REGISTRY_FREE, False)]
    if free:
        config.hook.pytest_deselected(items=free)
        items[:] = [item for item in items if not item.stash.get(_REGISTRY_FREE, False)]
        config.stash[_DESELECTED] = [item.nodeid for item in free]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    free = config.stash.get(_DESELECTED, [])
    if free:
        per_file: dict[str, int] = {}
        for nodeid in free:
            per_file[nodeid.split("::", 1)[0]] = per_file.get(nodeid.split("::", 1)[0], 0) + 1
        terminalreporter.write_line(
            f"PostgreSQL pass: {len(free)} tests never reach the registry (tests/support/registry_use.py) and ran "
            "only on SQLite: " + ", ".join(f"{path.rsplit('/', 1)[-1]} {n}" for path, n in sorted(per_file.items())))


@pytest.fixture(autouse=True)
def _registry_free_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test classified as never opening the registry runs with a registry URL that cannot be opened."""
    if request.node.stash.get(_REGISTRY_FREE, False):
        monkeypatch.setenv(REGISTRY_URL_ENV, REGISTRY_FREE_URL)


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
        pg: PostgresServer = request.getfixturevalue("postgres")
        pg.migrate_template()  # every home's database starts migrated (postgres_url's stay empty: template0)
        os.environ[REGISTRY_URL_ENV] = pg.url(HOME_PLACEHOLDER)
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
