"""The pure parts of scripts/arm_check: cache keys, the wheel layer, the Pi 5 cpuinfo, step reporting, gating."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.arm import check, rootfs
from scripts.arm.steps import Steps


def test_the_rootfs_key_ignores_the_pins_and_the_wheel_layer_follows_them(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("numpy==2.4.6\n")
    b.write_text("numpy==2.4.5\n")
    assert rootfs.cache_key() == rootfs.cache_key(), "stable across runs"
    assert rootfs.requirements_hash(a) != rootfs.requirements_hash(b)


def test_changed_pins_replace_only_what_the_wheels_added(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "rootfs"
    site = rootfs._site(root)
    (site / "pip").mkdir(parents=True)
    (site / "old_pkg").mkdir()
    (site / "old_mod.py").write_text("")
    (root / rootfs.BASE_SITE).write_text(json.dumps(["pip"]))
    req = tmp_path / "req.txt"
    req.write_text("numpy==2.4.6\n")
    installed: list[Path] = []

    def fake_install(r: Path, requirements: Path) -> None:  # pip with --platform needs the network
        installed.append(requirements)
        (rootfs._site(r) / "numpy").mkdir()

    monkeypatch.setattr(rootfs, "_install_wheels", fake_install)
    assert rootfs.ensure_wheels(root, req) is True
    assert sorted(p.name for p in site.iterdir()) == ["numpy", "pip"]
    assert rootfs.ensure_wheels(root, req) is False, "same pins: nothing to do"
    req.write_text("numpy==2.4.5\n")
    (site / "numpy").rmdir()
    assert rootfs.ensure_wheels(root, req) is True
    assert len(installed) == 2


def test_pi5_cpuinfo_describes_cortex_a76_cores() -> None:
    text = rootfs.pi5_cpuinfo(3)
    assert text.count("processor\t:") == 3
    assert text.count("CPU part\t: 0xd0b") == 3, "Cortex-A76"
    assert "asimddp" in text, "the dot-product extension the raspberry-pi-5 profile relies on"


def test_steps_time_record_and_reraise_failures(tmp_path: Path) -> None:
    steps = Steps()
    with steps.step("fine") as info:
        info["detail"] = "all good"
    with pytest.raises(ValueError, match="broken"), steps.step("bad"):
        raise ValueError("broken\nsecond line")
    assert [(s.name, s.ok) for s in steps.done] == [("fine", True), ("bad", False)]
    table = steps.table()
    assert "all good" in table and "FAIL" in table and "second line" not in table
    steps.write_json(tmp_path / "out.json", ok=False)
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["ok"] is False and [s["ok"] for s in data["steps"]] == [True, False]


def test_if_possible_says_why_it_does_not_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEFLEET_ARM_CHECK", "0")
    assert check.main(["--if-possible"]) == 0
    assert "arm_check NOT RUN: skipped (EDGEFLEET_ARM_CHECK=0)" in capsys.readouterr().out
    monkeypatch.setattr(check.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("EDGEFLEET_ARM_CHECK", "require")
    assert check.main(["--if-possible"]) == 1, "require: not being able to run is a failure"
    assert "NOT RUN: needs root" in capsys.readouterr().out


def test_nothing_is_mounted_outside_a_private_mount_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFLEET_ARM_HOST_MNTNS", raising=False)
    monkeypatch.delenv("EDGEFLEET_ARM_NO_NAMESPACE", raising=False)
    assert "not in a private mount namespace" in (rootfs.private_namespace() or "")
    monkeypatch.setenv("EDGEFLEET_ARM_HOST_MNTNS", rootfs.os.readlink("/proc/self/ns/mnt"))
    assert "not in a private mount namespace" in (rootfs.private_namespace() or ""), "still the host's namespace"
    monkeypatch.setenv("EDGEFLEET_ARM_NO_NAMESPACE", "unshare: Operation not permitted")
    assert rootfs.private_namespace() == "cannot make a private mount namespace: unshare: Operation not permitted"
    ran: list[list[str]] = []
    monkeypatch.setattr(rootfs, "run", lambda argv, **kw: ran.append(argv) or "")
    with pytest.raises(rootfs.ArmCheckError, match="refusing to mount"), rootfs.mounted(tmp_path):
        pass
    assert ran == [] and not (tmp_path / "proc").exists(), "nothing was attempted"
