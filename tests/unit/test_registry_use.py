"""The PostgreSQL pass's test selection (tests/support/registry_use.py): what reaches the registry and what not."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.registry_use import RegistryReach
from tests.support.servers.fleet import Fleet
from tests.support.servers.stub import FleetServer


@pytest.fixture(scope="module")
def reach() -> RegistryReach:
    return RegistryReach()


def _in_process_server(tmp: Path) -> None:
    Fleet(tmp, None, None)  # type: ignore[arg-type]  # never called: only what the code names counts


def _local_import() -> None:
    from server.app import FleetServer as Server

    Server(None)  # type: ignore[arg-type]


def _cli_process(home: Path) -> None:
    subprocess.run([sys.executable, "-m", "server", "--home", str(home), "devices", "list"], check=False)


def _agent_process(config: Path) -> None:
    subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(config)], check=False)


def _python_c(home: Path) -> None:
    code = "from server.registry.catalog import Catalog\nCatalog.open(sys.argv[1])\n"
    subprocess.run([sys.executable, "-c", code, str(home)], check=False)


def _module_by_name() -> None:
    importlib.import_module("server.commands.admin")


def _stub_only() -> None:
    FleetServer(None)  # type: ignore[call-arg]


@pytest.mark.parametrize("code", [_in_process_server, _local_import, _cli_process, _python_c, _module_by_name])
def test_what_opens_a_registry_is_found(reach: RegistryReach, code: object) -> None:
    assert reach.reaches(code)


@pytest.mark.parametrize("code", [_agent_process, _stub_only])
def test_agent_and_stand_in_code_is_registry_free(reach: RegistryReach, code: object) -> None:
    assert not reach.reaches(code)


def test_the_agents_own_modules_never_reach_it(reach: RegistryReach) -> None:
    import tests.support.devices.fixtures as device_fixtures

    assert not reach.reaches(device_fixtures)
