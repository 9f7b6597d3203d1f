"""One CLI path: fleet commands reach the server only through the API's route table (over HTTP or
in-process), so the CLI cannot do what the API cannot."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from server.cli import main
from server.config import load_config
from server.registry.fleet import open_registry

COMMANDS = Path(__file__).resolve().parents[3] / "server" / "commands"
#: what a command module may not import: the registry, the service layer and the server process
BYPASSES = ("server.registry", "server.service", "server.app", "server.model_ops")


#: vocabulary a command may share with the registry (names only, no access)
VOCABULARY = {("server.registry.rollouts", "FINISHED_STATUSES")}


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every ``from server... import name`` anywhere in the file."""
    return [(n.module, a.name) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("server") for a in n.names]


@pytest.mark.parametrize("module", ["fleet.py", "rollouts.py", "access.py", "common.py"])
def test_fleet_commands_only_speak_the_api(module: str) -> None:
    imported = [i for i in _imports(COMMANDS / module) if i not in VOCABULARY]
    assert not [m for m, _ in imported if m.startswith(BYPASSES)], imported


def test_admin_opens_the_registry_only_for_machine_files() -> None:
    """keys init and broker config write this machine's files; tokens go through the API."""
    src = (COMMANDS / "admin.py").read_text()
    tree = ast.parse(src)
    users = sorted(f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                   and any(isinstance(n, ast.Name) and n.id == "open_registry" for n in ast.walk(f)))
    assert users == ["cmd_broker_config", "cmd_keys_init"]


def test_tokens_go_through_the_route_table_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    assert main(["--home", str(home), "keys", "init"]) == 0
    assert main(["--home", str(home), "tokens", "create", "ci", "--role", "read"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith("eft_")
    assert main(["--home", str(home), "tokens", "create", "ci", "--role", "read"]) == 1  # exists: a conflict
    assert "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses an unknown role before anything runs
        main(["--home", str(home), "tokens", "create", "ops", "--role", "root"])
    assert main(["--home", str(home), "tokens", "revoke", "ci"]) == 0
    assert main(["--home", str(home), "tokens", "revoke", "ci"]) == 1  # no active token by that name
    registry = open_registry(load_config(home))
    try:
        audit = [(a.action, a.target, a.outcome) for a in reversed(registry.list_audit(limit=10))]
        assert ("token_create", "token:ci", "ok") in audit
        assert ("token_revoke", "token:ci", "ok") in audit
        assert any(action == "token_revoke" and outcome == "error:not_found" for action, _, outcome in audit)
        assert all(a.actor.startswith("local:") for a in registry.list_audit(limit=10))
        assert json.dumps([a.params for a in registry.list_audit(limit=10)]).find(token) == -1
    finally:
        registry.db.close()
