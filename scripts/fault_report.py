#!/usr/bin/env python3
"""Run the fault suite (tests/faults) and print what it proved: one row per scenario.

    scripts/fault_report.py                 the default suite (what scripts/test runs), ~3 minutes on 2 cores
    scripts/fault_report.py --quick         fewer trials and payloads per scenario (a smoke run)
    scripts/fault_report.py --soak          >= 50 agent kill -9 trials, 20,000 payloads per topic, more of everything
    scripts/fault_report.py --json out.json also write the figures as JSON

Columns: scenario, trials, passed, devices left unserving, records lost. JSON keys: ``scenarios`` (a
list with ``name``, ``trials``, ``passed``, ``unserving``, ``lost``, ``notes``, and ``not_run`` when a
scenario could not run here), ``unserving``, ``lost``, plus ``mode``, ``duration_s``, ``pytest_exit``.
Every scenario runs against a real mosquitto, real agent processes and the real digits model; each
test records its trials in a ledger (tests/support/faults.py) that this script reads back. A test
that failed before recording anything counts as one failed trial. Exit status: 0 when every trial
passed and nothing was left unserving or lost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.faults import LEDGER_ENV, MODE_ENV  # noqa: E402


def run_suite(mode: str, extra: list[str]) -> tuple[int, list[dict[str, Any]], float]:
    with tempfile.TemporaryDirectory(prefix="fault-report-") as tmp:
        ledger = Path(tmp) / "ledger.jsonl"
        junit = Path(tmp) / "junit.xml"
        env = {**os.environ, LEDGER_ENV: str(ledger), MODE_ENV: mode, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "pytest", "tests/faults", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *extra]
        started = time.monotonic()
        done = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
        duration = time.monotonic() - started
        rows = [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.exists() else []
        rows += _unrecorded(junit, {r["name"] for r in rows})
    return done.returncode, rows, duration


def _unrecorded(junit: Path, recorded: set[str]) -> list[dict[str, Any]]:
    """Tests that failed before their ledger could record anything (fixture errors): one failed trial each."""
    if not junit.exists():
        return []
    out = []
    for case in ET.parse(junit).iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1].removeprefix("test_")
        name = f"{module}.{case.get('name', '').removeprefix('test_')}"
        if name in recorded:
            continue
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped")
        row: dict[str, Any] = {"name": name, "trials": 1, "passed": 0 if failed else 1, "unserving": 0, "lost": 0,
                               "notes": ["failed before recording a trial"] if failed else []}
        if skipped is not None:
            row |= {"trials": 0, "passed": 0, "not_run": skipped.get("message", "skipped")}
        out.append(row)
    return out


def render(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    table = Table(title=f"edgefleet fault suite ({summary['mode']}, {summary['duration_s']:.0f} s)")
    for col, justify in (("scenario", "left"), ("trials", "right"), ("passed", "right"),
                         ("devices left unserving", "right"), ("records lost", "right"), ("notes", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        ok = r["passed"] == r["trials"] and not r.get("not_run")
        passed = "NOT RUN" if r.get("not_run") else f"[{'green' if ok else 'red'}]{r['passed']}[/]"
        notes = r.get("not_run") or "; ".join(r.get("notes", []))
        table.add_row(escape(r["name"]), str(r["trials"]), passed, str(r["unserving"]), str(r["lost"]),
                      escape(notes[:120]))
    table.add_section()
    table.add_row("total", str(summary["trials"]), str(summary["passed"]), str(summary["unserving"]),
                  str(summary["lost"]), f"{summary['not_run']} not run")
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer trials and payloads per scenario")
    mode.add_argument("--soak", action="store_true", help=">= 50 kill -9 trials and more of everything")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("-k", metavar="EXPR", help="only scenarios matching this pytest -k expression")
    args = parser.parse_args(argv)
    mode_name = "soak" if args.soak else "quick" if args.quick else "default"
    code, rows, duration = run_suite(mode_name, ["-k", args.k] if args.k else [])
    rows.sort(key=lambda r: r["name"])
    summary = {
        "mode": mode_name,
        "duration_s": round(duration, 1),
        "pytest_exit": code,
        "trials": sum(r["trials"] for r in rows),
        "passed": sum(r["passed"] for r in rows),
        "unserving": sum(r["unserving"] for r in rows),
        "lost": sum(r["lost"] for r in rows),
        "not_run": sum(1 for r in rows if r.get("not_run")),
    }
    render(rows, summary)
    if args.json:
        doc = {"scenarios": rows, **summary}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    failed = summary["passed"] != summary["trials"] or summary["unserving"] or summary["lost"] or code not in (0, 5)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
