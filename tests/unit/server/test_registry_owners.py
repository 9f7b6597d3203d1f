"""Every SQL statement on a registry table sits in the module that owns the table; writes never
cross owners (a read may join another owner's table), and nothing outside ``server/registry`` runs SQL."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SERVER = Path(__file__).resolve().parents[3] / "server"
OWNERS = {
    "devices": {"devices", "device_groups", "enroll_requests", "unregistered_presence"},
    "rollouts": {"artifacts", "deployments", "deployment_builds", "deployment_devices"},
    "outbox": {"desired", "commands", "leases"},
    "observations": {"events", "telemetry"},
    "access": {"api_tokens", "audit"},
    "catalog": {"catalog_models", "catalog_versions", "catalog_builds"},
    "measurements": {"device_measurements", "probe_artifacts"},
}
WRITE = re.compile(r"\b(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(\w+)", re.IGNORECASE)
READ = re.compile(r"\b(?:FROM|JOIN)\s+(\w+)", re.IGNORECASE)


def _sql(path: Path) -> list[str]:
    """The SQL text of each ``execute``/``executemany`` call (string constants and f-string parts)."""
    out = []
    for n in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.args):
            continue
        if n.func.attr in ("execute", "executemany"):
            strings = [c.value for c in ast.walk(n.args[0]) if isinstance(c, ast.Constant)]
            out.append(" ".join(v for v in strings if isinstance(v, str)))
    return out


def test_no_sql_outside_the_registry() -> None:
    found = {str(p.relative_to(SERVER)): s for p in SERVER.rglob("*.py") if "registry" not in p.parts
             for s in _sql(p) if WRITE.search(s) or READ.search(s)}
    assert not found, found


def test_each_owner_writes_only_its_tables_and_reads_known_ones() -> None:
    every = set().union(*OWNERS.values())
    for owner, tables in OWNERS.items():
        statements = _sql(SERVER / "registry" / f"{owner}.py")
        assert statements, owner
        for s in statements:
            written = {t.lower() for t in WRITE.findall(s)} & every
            assert written <= tables, (owner, s)
            read = {t.lower() for t in READ.findall(s)} - {"excluded"}
            assert read <= every, (owner, s)  # no table the registry does not know


def test_the_console_queries_only_read() -> None:
    tree = ast.parse((SERVER / "registry" / "console.py").read_text())
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    sql_writes = re.compile(r"\b(?:INSERT INTO|UPDATE|DELETE FROM|REPLACE INTO)\s+\w+")  # SQL keywords are upper case
    assert any("SELECT" in s for s in strings) and not [s for s in strings if sql_writes.search(s)]


def test_the_composite_runs_no_sql_of_its_own() -> None:
    assert _sql(SERVER / "registry" / "fleet.py") == []
