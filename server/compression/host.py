"""The build machine as a stand-in for a device profile: whether latency timed here means anything there.

The x86 profiles are timed on an x86 build machine with their ISA features; ARM, GPU and accelerator
profiles are not (their latency comes from the devices: probes and warm-ups, server/measured.py).
"""

from __future__ import annotations

import platform
from pathlib import Path

from server.profiles import DeviceProfile


def host_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def stand_in(profile: DeviceProfile) -> tuple[bool, str]:
    """Whether latency measured here says something about the profile; the reason either way."""
    if profile.gpu or profile.accelerator:
        return False, f"{profile.id} runs on {profile.gpu or profile.accelerator}, which this machine lacks"
    if profile.arch != host_arch():
        return False, f"{profile.id} is {profile.arch}, this machine is {host_arch()}"
    flags = host_flags()
    aliases = {"neon": "asimd"}
    missing = [f for f in profile.isa_features if f not in flags and aliases.get(f) not in flags]
    if missing:
        return False, f"this machine lacks {', '.join(missing)}"
    extra = sorted({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"} & flags - set(profile.isa_features))
    note = f" (this machine also has {', '.join(extra)}: int8 timings are optimistic)" if extra else ""
    return True, f"measured on this {host_arch()} machine, 1 thread{note}"
