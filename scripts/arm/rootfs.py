"""The arm64 Debian bookworm root filesystem scripts/arm_check runs the agent in, built once and cached.

Layout of the cache (``~/.cache/edgefleet/arm64-rootfs``, or ``$EDGEFLEET_CACHE/arm64-rootfs``)::

    <key>/            a finished root filesystem (``<key>/.edgefleet-rootfs.json`` marks it complete)
    <key>.partial/    a build in progress (removed and restarted if a build was interrupted)

``key`` hashes the Debian suite, the package list and the builder's version; older keys are removed after a
successful build. The wheels are a second layer: ``<key>/.edgefleet-wheels`` holds the hash of
``requirements-aarch64.txt`` they were installed from; when the pins change, only the venv's packages are
replaced (seconds, native) and the debootstrap layer (minutes, emulated) is kept.

Build steps (all as root): ``debootstrap --foreign --arch=arm64`` (download and unpack, native), then the
second stage inside the chroot under qemu-user (binfmt), ``python3 -m venv /opt/edgefleet/venv`` inside,
and the pinned aarch64 wheels from PyPI installed into that venv's site-packages by the host's pip
(``--platform manylinux*_aarch64 --only-binary=:all:``: the same wheels a Raspberry Pi would get, unpacked at
native speed instead of under emulation).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BUILDER_VERSION = 2
SUITE = "bookworm"
MIRROR = os.environ.get("EDGEFLEET_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ("python3", "python3-venv", "ca-certificates", "procps")
VENV = "/opt/edgefleet/venv"
PYTHON_VERSION = "3.11"  # bookworm's python3
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
STAMP = ".edgefleet-rootfs.json"
WHEELS_STAMP = ".edgefleet-wheels"
BASE_SITE = ".edgefleet-base-site.json"  # what the venv's site-packages held before any wheel
REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "requirements-aarch64.txt"


class ArmCheckError(RuntimeError):
    """A step of the arm64 check failed (the message says which and why)."""


def log(msg: str) -> None:
    print(f"[arm] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    base = os.environ.get("EDGEFLEET_CACHE") or str(Path.home() / ".cache" / "edgefleet")
    return Path(base) / "arm64-rootfs"


def cache_key() -> str:
    text = f"{BUILDER_VERSION}|{SUITE}|{','.join(PACKAGES)}|{VENV}|{PYTHON_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def requirements_hash(requirements: Path) -> str:
    return hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]


def run(argv: list[str], *, what: str, timeout: float = 1800, quiet: bool = True, **kw: object) -> str:
    """Run a command; on failure raise ArmCheckError with the tail of its output."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ArmCheckError(f"{what}: {exc}") from exc
    out = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-25:])
        raise ArmCheckError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    if not quiet and out.strip():
        print(out, end="", file=sys.stderr)
    return str(proc.stdout or "")


# -- mounts ----------------------------------------------------------------------------------------------------


#: Raspberry Pi 5: Cortex-A76 (implementer 0x41, part 0xd0b), the features its kernel reports.
PI5_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
CPUINFO_FILE = "/.edgefleet-cpuinfo"
#: the emulated CPU (qemu-user reads QEMU_CPU): the raspberry-pi-5 profile's core, so no SVE and friends
QEMU_CPU = "cortex-a76"


def pi5_cpuinfo(cpus: int) -> str:
    block = (
        "processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: {f}\nCPU implementer\t: 0x41\n"
        "CPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n"
    )
    return "".join(block.format(n=n, f=PI5_FEATURES) for n in range(cpus))


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first (the order to unmount them in)."""
    prefix = str(root.resolve())
    points = []
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        for line in fh:
            point = line.split()[1].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def unmount_all(root: Path) -> list[str]:
    """Unmount everything below ``root`` (lazily if busy); returns what was still mounted."""
    for point in mounts_under(root):
        if subprocess.run(["umount", point], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return mounts_under(root)


def private_namespace() -> str | None:
    """None when this process may mount: it is in a mount namespace of its own (scripts/arm_check starts it
    under ``unshare --mount --propagation private``, so nothing it mounts can reach the host) whose root is
    not shared; else why it may not."""
    if os.environ.get("EDGEFLEET_ARM_NO_NAMESPACE"):
        return f"cannot make a private mount namespace: {os.environ['EDGEFLEET_ARM_NO_NAMESPACE'].strip()}"
    host = os.environ.get("EDGEFLEET_ARM_HOST_MNTNS")
    try:
        here = os.readlink("/proc/self/ns/mnt")
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            roots = [ln.split(" - ")[0].split()[6:] for ln in fh if ln.split()[4] == "/"]
        root_fields = roots[-1] if roots else None  # the topmost mount on /
    except OSError as exc:
        return f"cannot read this process's mount namespace: {exc}"
    if not host or host == here:
        return "not in a private mount namespace (run scripts/arm_check, which makes one with unshare)"
    if root_fields is None or any(f.startswith("shared:") for f in root_fields):
        return "the mount namespace's root is shared with the host (expected unshare --propagation private)"
    return None


@contextmanager
def mounted(root: Path, binds: dict[str, Path] | None = None) -> Iterator[Path]:
    """/proc, /sys, /dev (recursively: /dev/pts, /dev/shm) mounted into ``root``, plus read-only ``binds``
    (path inside -> host directory); all unmounted on every way out. Only in a private mount namespace:
    the host never sees these mounts, and they go away with the namespace even if this process is killed."""
    reason = private_namespace()
    if reason is not None:
        raise ArmCheckError(f"refusing to mount into {root}: {reason}")
    try:
        for target, argv in (
            ("proc", ["mount", "-t", "proc", "proc"]),
            ("sys", ["mount", "--rbind", "/sys"]),
            ("dev", ["mount", "--rbind", "/dev"]),
        ):
            point = root / target
            point.mkdir(exist_ok=True)
            if str(point.resolve()) not in mounts_under(root):
                run([*argv, str(point)], what=f"mount {point}")
                if target != "proc":
                    subprocess.run(["mount", "--make-rslave", str(point)], capture_output=True, check=False)
        # qemu-user shows the emulated programs the host's x86 /proc/cpuinfo; CPU-feature probes (cpuinfo, used
        # by XNNPACK in LiteRT) find no ARM core there and crash. Show them the board's: Raspberry Pi 5 cores.
        fake = root / CPUINFO_FILE.lstrip("/")
        fake.write_text(pi5_cpuinfo(os.cpu_count() or 1))
        run(["mount", "--bind", str(fake), str(root / "proc" / "cpuinfo")], what="bind /proc/cpuinfo")
        for inside, host in (binds or {}).items():
            point = root / inside.lstrip("/")
            point.mkdir(parents=True, exist_ok=True)
            run(["mount", "--bind", str(host), str(point)], what=f"bind {host}")
            subprocess.run(["mount", "-o", "remount,bind,ro", str(point)], capture_output=True, check=False)
        yield root
    finally:
        left = unmount_all(root)
        if left:
            log(f"WARNING: still mounted after cleanup: {left}")


def chroot(root: Path, argv: list[str], *, what: str, timeout: float = 1800, env: dict[str, str] | None = None) -> str:
    base_env = {
        "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "QEMU_CPU": QEMU_CPU,
    }
    return run(["chroot", str(root), *argv], what=what, timeout=timeout, env={**base_env, **(env or {})})


# -- host prerequisites ------------------------------------------------------------------------------------------


def binfmt_ready() -> str | None:
    """None when aarch64 binaries can run here, else the reason they cannot."""
    entry = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if not entry.exists():
        return "binfmt_misc has no qemu-aarch64 handler (install qemu-user-static and binfmt-support)"
    text = entry.read_text()
    if not text.startswith("enabled"):
        return "the qemu-aarch64 binfmt handler is disabled"
    if "flags: " in text and "F" not in text.split("flags: ", 1)[1].split("\n", 1)[0]:
        return "the qemu-aarch64 binfmt handler lacks the F (fix-binary) flag needed in a chroot"
    return None


def ensure_host_tools(*, install: bool = True) -> None:
    """debootstrap + qemu-user-static + binfmt registration; apt-get installs them when allowed."""
    if os.geteuid() != 0:
        raise ArmCheckError("needs root (debootstrap, mount and chroot)")
    reason = private_namespace()
    if reason is not None:  # nothing below may touch the host's mounts
        raise ArmCheckError(reason)
    missing = [t for t in ("debootstrap", "qemu-aarch64-static", "update-binfmts") if shutil.which(t) is None]
    if missing and install:
        log(f"installing Debian packages for {', '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], what="apt-get update", env=env)
        run(
            ["apt-get", "install", "-y", "-qq", "qemu-user-static", "binfmt-support", "debootstrap"],
            what="apt-get install qemu-user-static binfmt-support debootstrap",
            env=env,
        )
    missing = [t for t in ("debootstrap", "qemu-aarch64-static", "update-binfmts") if shutil.which(t) is None]
    if missing:
        raise ArmCheckError(f"missing host tools: {', '.join(missing)}")
    binfmt_root = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt_root / "register").exists():  # a mount in our private namespace: the host never sees it
        argv = ["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt_root)]
        subprocess.run(argv, check=False, capture_output=True)
    if binfmt_ready() is not None:
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=False, capture_output=True)
    reason = binfmt_ready()
    if reason is not None:
        raise ArmCheckError(reason)


# -- the build ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rootfs:
    path: Path
    key: str
    built_now: bool
    build_s: float
    wheels_now: bool = False

    @property
    def python(self) -> str:
        return f"{VENV}/bin/python"

    def site_packages(self) -> Path:
        return self.path / VENV.lstrip("/") / "lib" / f"python{PYTHON_VERSION}" / "site-packages"


def _site(root: Path) -> Path:
    return root / VENV.lstrip("/") / "lib" / f"python{PYTHON_VERSION}" / "site-packages"


def ensure_wheels(root: Path, requirements: Path) -> bool:
    """The pinned wheels in the rootfs venv; True when they had to be (re)installed."""
    want = requirements_hash(requirements)
    stamp = root / WHEELS_STAMP
    if stamp.is_file() and stamp.read_text().strip() == want:
        return False
    site = _site(root)
    base = set(json.loads((root / BASE_SITE).read_text()))
    for entry in site.iterdir():
        if entry.name not in base:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    _install_wheels(root, requirements)
    stamp.write_text(want + "\n")
    return True


def _install_wheels(root: Path, requirements: Path) -> None:
    site = _site(root)
    if not site.is_dir():
        raise ArmCheckError(f"the rootfs venv has no {site}")
    argv = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile"]
    argv += ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    argv += ["--abi", f"cp{PYTHON_VERSION.replace('.', '')}", "--abi", "abi3", "--abi", "none"]
    for platform in PLATFORMS:
        argv += ["--platform", platform]
    argv += ["--upgrade", "--target", str(site), "-r", str(requirements)]
    run(argv, what="pip install (aarch64 wheels from PyPI)")
    # --target leaves console scripts for the host; nothing in the rootfs needs them
    shutil.rmtree(site / "bin", ignore_errors=True)
    # bytecode is the same on every architecture: compiling it natively saves minutes of emulated imports
    if sys.version_info[:2] == tuple(int(x) for x in PYTHON_VERSION.split(".")):
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", "-j", "0", str(site)], capture_output=True, check=False
        )


def build(requirements: Path = REQUIREMENTS, *, rebuild: bool = False) -> Rootfs:
    """The cached root filesystem with these requirements installed, building what is missing."""
    key = cache_key()
    cache = cache_dir()
    final = cache / key
    if (final / STAMP).is_file() and not rebuild:
        t0 = time.monotonic()
        wheels_now = ensure_wheels(final, requirements)
        return Rootfs(final, key, built_now=False, build_s=time.monotonic() - t0, wheels_now=wheels_now)
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"{key}.partial"
    for stale in (partial, final):
        if stale.exists():
            if unmount_all(stale):
                raise ArmCheckError(f"cannot unmount everything under {stale}")
            shutil.rmtree(stale)
    t0 = time.monotonic()
    log(f"building arm64 {SUITE} rootfs in {partial} (cold build: several minutes)")
    run(
        [
            "debootstrap",
            "--foreign",
            "--arch=arm64",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(partial),
            MIRROR,
        ],
        what="debootstrap --foreign (first stage)",
    )
    log(f"  first stage done in {time.monotonic() - t0:.0f} s; second stage under qemu")
    with mounted(partial):
        chroot(partial, ["/debootstrap/debootstrap", "--second-stage"], what="debootstrap --second-stage")
        log(f"  second stage done at {time.monotonic() - t0:.0f} s; creating {VENV}")
        chroot(partial, ["/usr/bin/python3", "-m", "venv", VENV], what="python3 -m venv")
    (partial / BASE_SITE).write_text(json.dumps(sorted(p.name for p in _site(partial).iterdir())))
    ensure_wheels(partial, requirements)
    # apt's package cache is not needed to run anything
    shutil.rmtree(partial / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (partial / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    build_s = time.monotonic() - t0
    stamp = {"key": key, "suite": SUITE, "built_at": time.time(), "build_s": round(build_s, 1)}
    (partial / STAMP).write_text(json.dumps(stamp, indent=1))
    partial.rename(final)
    for other in cache.iterdir():
        if other.name != key and other.is_dir() and not mounts_under(other):
            shutil.rmtree(other, ignore_errors=True)
    return Rootfs(final, key, built_now=True, build_s=build_s, wheels_now=True)


def main() -> int:
    ensure_host_tools()
    fs = build(rebuild="--rebuild" in sys.argv)
    log(f"rootfs {fs.path} ({f'built in {fs.build_s:.0f} s' if fs.built_now else 'cached'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
