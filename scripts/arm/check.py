"""scripts/arm_check: the agent on an emulated arm64 Debian bookworm (Raspberry Pi OS 64-bit's base).

    scripts/arm_check                  rootfs (cached) + install + arch/imports + unit tests + scenario
    scripts/arm_check --skip-unit      without the agent's unit tests inside the emulated Python
    scripts/arm_check --rebuild        rebuild the cached root filesystem first
    scripts/arm_check --json out.json  also write the step timings
    scripts/arm_check --if-possible    (scripts/test) print "arm_check NOT RUN: <reason>" and exit 0 where this
                                       machine cannot run it; EDGEFLEET_ARM_CHECK=0 skips, =require fails instead

Needs root (debootstrap, mount, chroot) and qemu-user-static with binfmt; installs Debian's
qemu-user-static, binfmt-support and debootstrap when they are missing. Exits non-zero on any failure.
/proc, /sys and /dev are mounted into the rootfs only while it runs and unmounted on every way out
(including SIGTERM/SIGINT). scripts/arm_check runs this module in mount and PID namespaces of its own
(unshare), so the host never sees these mounts and a SIGKILL leaves neither a mount nor a process behind;
outside such a namespace it refuses to mount anything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path

from scripts.arm.rootfs import (
    PYTHON_VERSION,
    REPO,
    VENV,
    ArmCheckError,
    Rootfs,
    build,
    cache_dir,
    chroot,
    ensure_host_tools,
    log,
    mounted,
    run,
)
from scripts.arm.steps import Steps

SRC_IN = "/opt/edgefleet/src"  # the checkout's tests, copied for the emulated unit-test run
MODELS_IN = "/opt/edgefleet/cache/models"  # the host's model cache, bind-mounted read-only
#: the agent's unit tests (the rest of tests/unit exercises server modules the device never runs)
AGENT_UNIT_TESTS = (
    "tests/unit/agent_runtime",
    "tests/unit/core",
    "tests/unit/protocol",
    "tests/unit/test_layering.py",
    "tests/unit/test_serving_codecs.py",
    "tests/unit/test_serving_stats.py",
)
IMPORTS = (
    "import platform, sys, numpy, onnxruntime, cryptography, psutil, paho.mqtt, ai_edge_litert, agent;"
    "from ai_edge_litert.interpreter import Interpreter;"
    "print(platform.machine(), '%d.%d.%d' % sys.version_info[:3], numpy.__version__, onnxruntime.__version__,"
    " cryptography.__version__, agent.__version__)"
)


TERMINATING = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _terminate(signum: int, frame: types.FrameType | None) -> None:
    for sig in TERMINATING:  # once: a second signal (Ctrl-C reaches us directly and via the wrapper) must not
        signal.signal(sig, signal.SIG_IGN)  # interrupt the cleanup below
    raise SystemExit(128 + signum)  # unwinds through every finally: agent, broker, mounts


#: a test hook: the path of a FIFO; once everything is mounted, the check says so on stderr and waits until a
#: writer opens and closes it (tests/integration/test_arm_check_mounts.py kills it there)
PAUSE_AFTER_MOUNT = "EDGEFLEET_ARM_PAUSE_AFTER_MOUNT"


def pause_after_mount() -> None:
    barrier = os.environ.get(PAUSE_AFTER_MOUNT)
    if not barrier:
        return
    if not Path(barrier).is_fifo():
        raise ArmCheckError(f"{PAUSE_AFTER_MOUNT}={barrier} is not a FIFO")
    log(f"mounted; paused until {barrier} is written ({PAUSE_AFTER_MOUNT})")
    with open(barrier, "rb") as fh:  # blocks until a writer opens it
        fh.read()
    log("resumed")


def remove_stale_runs(root: Path) -> None:
    """Per-run directories a killed run left in the rootfs (we hold the lock: no other run is using one)."""
    for stale in (root / "tmp").glob("edgefleet-arm-*"):
        shutil.rmtree(stale, ignore_errors=True)


def install_agent(fs: Rootfs, work: Path) -> str:
    """Build this checkout's wheel on the host (pure Python) and pip-install it in the rootfs venv (emulated);
    its bytecode is compiled natively (the same on every architecture)."""
    t0 = time.monotonic()
    wheels = work / "wheel"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--disable-pip-version-check",
            "-w",
            str(wheels),
            str(REPO),
        ],
        what="pip wheel (this checkout)",
    )
    (wheel,) = wheels.glob("edgefleet-*.whl")
    built = time.monotonic() - t0
    inside = fs.path / "tmp" / wheel.name
    shutil.copy2(wheel, inside)
    try:
        chroot(
            fs.path,
            [
                f"{VENV}/bin/python",
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-index",
                "--force-reinstall",
                "--no-compile",
                "--disable-pip-version-check",
                f"/tmp/{wheel.name}",
            ],
            what="pip install edgefleet (emulated)",
        )
    finally:
        inside.unlink(missing_ok=True)
    installed = time.monotonic() - t0 - built
    site = fs.site_packages()
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(site / "agent"), str(site / "server")],
        capture_output=True,
        check=False,
    )
    return f"{wheel.name}: wheel {built:.1f} s (host), pip install {installed:.1f} s (emulated)"


def unit_tests(fs: Rootfs) -> str:
    src = fs.path / SRC_IN.lstrip("/")
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    shutil.copytree(REPO / "tests", src / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", src / "pyproject.toml")
    try:
        out = chroot(
            fs.path,
            [
                "/bin/sh",
                "-c",
                f"cd {SRC_IN} && {VENV}/bin/python -m pytest -q -p no:cacheprovider -x --timeout 900 "
                + " ".join(AGENT_UNIT_TESTS),
            ],
            what="pytest (agent unit tests, emulated aarch64)",
            timeout=3600,
            env={"EDGEFLEET_CACHE": MODELS_IN.rsplit("/", 1)[0]},
        )
    finally:
        shutil.rmtree(src, ignore_errors=True)
    summary = [ln for ln in out.splitlines() if " passed" in ln or " failed" in ln]
    return summary[-1].strip("= ") if summary else "no summary"


def why_not(*, install: bool) -> str | None:
    """None when this machine can run the check (installing the Debian packages if root), else why not."""
    mode = os.environ.get("EDGEFLEET_ARM_CHECK", "")
    if mode == "0":
        return "skipped (EDGEFLEET_ARM_CHECK=0)"
    if sys.platform != "linux":
        return f"needs Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "needs root (debootstrap, mount, chroot); run as root or set EDGEFLEET_ARM_CHECK=0"
    try:
        ensure_host_tools(install=install)
    except ArmCheckError as exc:
        return str(exc)
    return None


def exclusive(cache: Path) -> contextlib.AbstractContextManager[object]:
    """One run at a time per rootfs cache (scripts/arm_check already holds it when it started us)."""
    if os.environ.get("EDGEFLEET_ARM_LOCKED") == "1":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def locked() -> Iterator[object]:
        import fcntl  # noqa: PLC0415 - Linux only, like the rest of this check

        cache.mkdir(parents=True, exist_ok=True)
        with (cache / ".lock").open("a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log("another arm_check is running on this machine; waiting for it")
                fcntl.flock(fh, fcntl.LOCK_EX)
            yield fh

    return locked()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/arm_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-unit", action="store_true", help="skip the agent's unit tests under emulation")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached arm64 root filesystem")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install missing host tools")
    parser.add_argument("--json", type=Path, help="write the step timings here")
    parser.add_argument("--if-possible", action="store_true", help="NOT RUN (exit 0) where it cannot run")
    args = parser.parse_args(argv)
    if args.if_possible:
        reason = why_not(install=not args.no_install)
        if reason is not None:
            print(f"arm_check NOT RUN: {reason}", flush=True)
            return 1 if os.environ.get("EDGEFLEET_ARM_CHECK") == "require" else 0
    for sig in TERMINATING:
        signal.signal(sig, _terminate)

    steps = Steps()
    results: dict[str, object] = {}
    ok = False
    held = contextlib.ExitStack()
    try:
        held.enter_context(exclusive(cache_dir()))
        with steps.step("host tools (qemu-user-static, binfmt, debootstrap)"):
            ensure_host_tools(install=not args.no_install)
        with steps.step("arm64 bookworm rootfs") as info:
            fs = build(rebuild=args.rebuild)
            info["detail"] = f"built in {fs.build_s:.0f} s" if fs.built_now else f"cached {fs.key}"
            results["rootfs"] = "built" if fs.built_now else "cached"
        remove_stale_runs(fs.path)
        from tests.support.models import cache_dir as models_cache  # noqa: PLC0415 - numpy: not for --if-possible

        models = models_cache()
        scratch = os.environ.get("EDGEFLEET_ARM_WORK")  # made (and cleaned) by scripts/arm_check
        with (
            contextlib.nullcontext(scratch) if scratch else tempfile.TemporaryDirectory(prefix="edgefleet-arm-") as tmp,
            mounted(fs.path, binds={MODELS_IN: models}),
        ):
            work = Path(tmp)
            pause_after_mount()
            with steps.step("install the agent from this checkout (emulated pip)") as info:
                info["detail"] = install_agent(fs, work)
            with steps.step("arch + imports (emulated)") as info:
                out = chroot(fs.path, [f"{VENV}/bin/python", "-c", IMPORTS], what="imports").split()
                if not out or out[0] != "aarch64" or not out[1].startswith(PYTHON_VERSION):
                    raise ArmCheckError(f"expected aarch64 / Python {PYTHON_VERSION}, got {out}")  # noqa: TRY301
                info["detail"] = f"{out[0]}, Python {out[1]}, numpy {out[2]}, onnxruntime {out[3]}"
            if not args.skip_unit:
                with steps.step("agent unit tests (emulated Python)") as info:
                    info["detail"] = unit_tests(fs)
            from scripts.arm.scenario import run_scenario  # noqa: PLC0415 - after the rootfs checks

            results.update(run_scenario(fs.path, steps, work))
        ok = True
    except (ArmCheckError, subprocess.SubprocessError, OSError, RuntimeError, TimeoutError, AssertionError) as exc:
        log(f"FAILED: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    finally:
        held.close()  # the lock, after every mount of this run is gone
        print("\n" + steps.table(), flush=True)
        if args.json is not None:
            steps.write_json(args.json, ok=ok, results=results, emulated=True)
    print(f"arm_check: {'PASSED' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
