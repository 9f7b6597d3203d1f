"""The fault suite's fixtures: every test gets a ``ledger`` that scripts/fault_report.py aggregates.

Scenario names are ``<module>.<test>`` without the ``test_`` prefixes. A test that cannot run here
(no root for a mount) records NOT RUN in the ledger and is reported as a skip that says so.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from server.broker import MosquittoBroker
from server.builds import StaticBuilds
from tests.support.faults import FaultLedger
from tests.support.servers.fleet import Fleet


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        item.stash[_REPORT] = report


_REPORT = pytest.StashKey[pytest.TestReport]()


def scenario_name(item: pytest.Item) -> str:
    module = item.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")  # type: ignore[attr-defined]
    return f"{module}.{item.name.removeprefix('test_')}"


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> Iterator[FaultLedger]:
    book = FaultLedger(scenario_name(request.node))
    yield book
    report = request.node.stash.get(_REPORT, None)
    if report is None:
        return
    if report.skipped:
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        book.finish(False, not_run=reason.removeprefix("Skipped: "))
    else:
        book.finish(report.passed)


@pytest.fixture
def real_server(tmp_path: Path, broker: MosquittoBroker) -> Iterator[Fleet]:
    """The real server (registry, signer, rollout driver) in-process on the session broker, no builds."""
    with Fleet(tmp_path / "srv", broker, StaticBuilds()) as f:
        yield f
