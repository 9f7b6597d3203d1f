"""System telemetry: CPU, memory, temperature, disk, sampled on the agent's thread every N seconds.

psutil gives CPU, memory and disk everywhere; temperature comes from psutil's sensors where the
platform has them, else from ``/sys/class/thermal/thermal_zone*/temp`` (millidegrees; Raspberry
Pi and Jetson expose the SoC there), else it is simply absent from the report.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil

THERMAL_ROOT = Path("/sys/class/thermal")


@dataclass(frozen=True)
class SystemSample:
    cpu_percent: float
    memory_percent: float
    rss_bytes: int
    disk_free_bytes: int
    temperature_c: float | None


def machine_arch() -> str:
    """The CPU architecture as the kernel reports it (x86_64, aarch64, armv7l...)."""
    return platform.machine() or "unknown"


def read_temperature(thermal_root: Path = THERMAL_ROOT) -> float | None:
    """Highest temperature the board reports, in degrees Celsius, or None where there is no sensor."""
    readings: list[float] = []
    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is not None:
        with contextlib.suppress(OSError, RuntimeError, AttributeError):
            for entries in sensors().values():
                readings.extend(float(e.current) for e in entries if e.current is not None and e.current > -50)
    if not readings and thermal_root.is_dir():
        for zone in sorted(thermal_root.glob("thermal_zone*/temp")):
            with contextlib.suppress(OSError, ValueError):
                value = float(zone.read_text().strip())
                readings.append(value / 1000.0 if abs(value) > 200 else value)
    return max(readings) if readings else None


CPUFREQ_ROOT = Path("/sys/devices/system/cpu/cpu0/cpufreq")


@dataclass(frozen=True)
class CpuContext:
    """What moves a latency figure besides the model: governor, clock, temperature, other load."""

    governor: str | None
    cpu_mhz: float | None
    temperature_c: float | None
    load_avg: tuple[float, float, float] | None


def read_cpu_context(cpufreq_root: Path = CPUFREQ_ROOT, thermal_root: Path = THERMAL_ROOT) -> CpuContext:
    """Each part where the board exposes it, else None (containers and VMs often hide cpufreq)."""
    governor: str | None = None
    mhz: float | None = None
    with contextlib.suppress(OSError, UnicodeDecodeError):
        governor = (cpufreq_root / "scaling_governor").read_text().strip()[:32] or None
    with contextlib.suppress(OSError, ValueError):
        mhz = int((cpufreq_root / "scaling_cur_freq").read_text().strip()) / 1000.0
    load: tuple[float, float, float] | None = None
    with contextlib.suppress(OSError, AttributeError):
        one, five, fifteen = os.getloadavg()
        load = (round(one, 2), round(five, 2), round(fifteen, 2))
    return CpuContext(governor, mhz, read_temperature(thermal_root), load)


class SystemSampler:
    """CPU is measured between consecutive ``sample`` calls (the first call primes the counters)."""

    def __init__(self, disk_path: Path) -> None:
        self._disk_path = disk_path
        self._process = psutil.Process()
        psutil.cpu_percent(interval=None)

    def sample(self) -> SystemSample:
        try:
            disk_free = shutil.disk_usage(self._disk_path).free
        except OSError:
            disk_free = 0
        return SystemSample(
            cpu_percent=float(psutil.cpu_percent(interval=None)),
            memory_percent=float(psutil.virtual_memory().percent),
            rss_bytes=int(self._process.memory_info().rss),
            disk_free_bytes=int(disk_free),
            temperature_c=read_temperature(),
        )
