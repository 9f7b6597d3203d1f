"""scripts/stress_test: the README's test command (scripts/test), N times in a row, each from a fresh clone, while
a CPU hog keeps the machine busy. Standard library only (it runs before any venv exists).

    scripts/stress_test                          3 runs of HEAD, stress-ng --cpu 2
    scripts/stress_test --runs 5 --load 4        5 runs, 4 hog workers (--load 0: no hog)
    scripts/stress_test --commit main --json out.json
    scripts/stress_test --runs 2 --pytest-only -- -k test_layering    a quick self-check of this script

Each run: ``git clone`` of this checkout into a temporary directory, ``git checkout --detach COMMIT``,
``scripts/test [ARGS after --]`` there (it makes the clone's own .venv; the model cache, EDGEFLEET_CACHE, is
shared, so nothing is fetched twice), its output in ``run-N.log``; then the clone is removed. Per run it
reports the exit status, pytest's counts (its summary line), the failed tests, what py310_check and
arm_check said, and the duration; a table at the end, JSON with ``--json``. Exit status 0 only when every
run passed.

The hog is ``stress-ng --cpu N`` (Debian's package, installed with apt-get when missing, as root or with
sudo; failing that, N busy Python processes). It starts before the first run and stops after the last one,
on Ctrl-C, SIGTERM and SIGHUP; if this script is SIGKILLed, the kernel kills it (PR_SET_PDEATHSIG, and its
own PID namespace when root). ``--pytest-only`` (off by default) sets EDGEFLEET_PY310_CHECK=0 and
EDGEFLEET_ARM_CHECK=0 so a self-check with a small ``-k`` selection does not spend minutes on those checks.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PR_SET_PDEATHSIG = 1
SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped|deselected).*|no tests ran) in [\d.]+s")
COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)")
PHASE = re.compile(r"^\[test\] (\w+) .*?(\d+) s\)?$")  # scripts/test: "[test] mypy (at 31 s)", "[test] done in 640 s"
VERDICT = re.compile(r"^(py310_check|arm_check)(?:: (PASSED|FAILED)| NOT RUN: (.*))")


def log(msg: str) -> None:
    print(f"[stress] {msg}", file=sys.stderr, flush=True)


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum: int, frame: object) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # once: the cleanup must not be interrupted
    raise Interrupted(signum)


def die_with_parent() -> None:
    """preexec_fn: the kernel SIGKILLs this child when this script dies (even by SIGKILL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# -- the guardian: stops what we started when we die, however we die ---------------------------------------------


def guard(stdin: Iterator[str], grace: float = 60) -> int:
    """``stress_test.py --guard``: reads ``+PGID`` / ``-PGID`` lines (process groups to stop / no longer to stop)
    and ``+/PATH`` / ``-/PATH`` (directories to remove / keep) until EOF, which comes when the script has
    exited, SIGKILL included (the pipe's last writer is gone). Then it sends SIGINT to every group still
    listed (pytest tears its fixtures down), SIGKILL to those still alive after ``grace`` seconds, and removes
    the directories still listed (the clone of an interrupted run)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the script's to handle; we act on EOF
    groups: set[int] = set()
    paths: set[str] = set()
    for line in stdin:
        sign, item = line[:1], line[1:].rstrip("\n")
        if item.startswith("/"):
            (paths.add if sign == "+" else paths.discard)(item)
        else:
            (groups.add if sign == "+" else groups.discard)(int(item))
    for sig in (signal.SIGINT, signal.SIGKILL):
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        deadline = time.monotonic() + grace
        while groups and time.monotonic() < deadline:
            groups = {g for g in groups if _group_alive(g)}
            time.sleep(0.2)  # polls observable state: does any process of the group remain?
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Guardian:
    """The guardian process (its own session: a SIGKILL to our process group does not reach it)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--guard"],
            stdin=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._said_gone = False

    def watch(self, item: int | Path, *, on: bool = True) -> None:
        """A process group to stop, or a directory to remove, if we die (``on=False``: no longer).

        A guardian that is gone (a signal to every process, as an interrupted session sends) is said once;
        our own cleanup goes on (a BrokenPipeError here turned a SIGTERM into a cascade of tracebacks).
        """
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{'+' if on else '-'}{item if isinstance(item, int) else item.resolve()}\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            self._gone()

    def _gone(self) -> None:
        if self.proc.poll() is not None and not self._said_gone:
            self._said_gone = True
            print(f"[stress] the guardian process exited ({self.proc.returncode}); cleaning up without it",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.proc.stdin.close()
        self.proc.wait()


# -- the CPU hog -------------------------------------------------------------------------------------------------


def ensure_stress_ng() -> str | None:
    """The stress-ng binary, installing Debian's package when missing; None when it cannot be had."""
    found = shutil.which("stress-ng")
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and shutil.which("sudo") is None:
        return None
    log("installing stress-ng from Debian's packages")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "stress-ng"]):
        if subprocess.run([*sudo, *argv], env=env, capture_output=True, check=False).returncode != 0:
            return None
    return shutil.which("stress-ng")


#: the fallback hog: N processes spinning, each dying with its parent
SPIN = """
import ctypes, multiprocessing, signal
def spin():
    libc = ctypes.CDLL(None)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    libc.prctl(15, b"edgefleet-hog", 0, 0, 0)  # PR_SET_NAME
    while True:
        pass
for _ in range(%d):
    multiprocessing.Process(target=spin).start()
"""


def hog_command(workers: int) -> tuple[list[str], str]:
    """The hog's command line (run in a PID namespace of its own when root) and a description of it."""
    binary = ensure_stress_ng()
    if binary is not None:
        argv, what = [binary, "--cpu", str(workers), "--quiet"], f"stress-ng --cpu {workers}"
    else:
        argv, what = [sys.executable, "-c", SPIN % workers], f"{workers} busy Python processes (no stress-ng)"
    if (
        os.geteuid() == 0
        and subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, check=False).returncode == 0
    ):
        argv = ["unshare", "--pid", "--fork", "--kill-child", *argv]  # whatever it forks dies with it
    return argv, what


WORKER_NAMES = ("stress-ng-cpu", "edgefleet-hog")


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += [int(child), *descendants(int(child))]
    return found


def busy_workers(pid: int) -> int:
    count = 0
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            count += Path(f"/proc/{child}/comm").read_text().strip() in WORKER_NAMES
    return count


@contextlib.contextmanager
def cpu_hog(workers: int, guardian: Guardian | None = None) -> Iterator[str]:
    """The hog running ``workers`` busy processes (it waits until they exist) until the block ends."""
    if workers <= 0:
        yield "none"
        return
    argv, what = hog_command(workers)
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent,  # noqa: PLW1509 - no threads here
    )
    if guardian is not None:
        guardian.watch(proc.pid)
    try:
        deadline = time.monotonic() + 60
        while busy_workers(proc.pid) < workers:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the CPU hog ({what}) did not start its {workers} workers")
            time.sleep(0.05)  # polls observable state: the workers' processes
        log(f"CPU hog: {what} (pid {proc.pid}), {workers} workers running")
        yield what
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if guardian is not None:
            guardian.watch(proc.pid, on=False)
        log("CPU hog stopped")


# -- one run -----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    n: int
    commit: str
    exit_status: int | None = None
    duration_s: float = 0.0
    clone_s: float = 0.0
    summary: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)
    phases_s: dict[str, int] = field(default_factory=dict)  # seconds per scripts/test phase (setup, ruff, ...)
    loadavg_end: float = 0.0  # the 1-minute load average when the run ended
    log: str = ""

    @property
    def passed(self) -> bool:
        return self.exit_status == 0


def parse_output(text: str, run: Run) -> None:
    """pytest's final summary line and short summary (FAILED/ERROR lines), the two checks' verdicts, and how
    long each phase of scripts/test took."""
    starts: dict[str, int] = {}
    phase_now = ""
    for line in text.splitlines():
        clean = line.strip()
        match = SUMMARY.match(clean)
        # the counts are the pytest phases' (py310_check runs pytest too: its own verdict says how it went);
        # the PostgreSQL pass's are added to the first pass's
        if match and phase_now in ("", "pytest", "pytest_postgresql"):
            if phase_now == "pytest_postgresql":
                run.summary += f"; on PostgreSQL: {match.group(1)}"
            else:
                run.summary, run.counts = match.group(1), {}
            for n, word in COUNT.findall(match.group(1)):
                key = {"error": "errors", "warning": "warnings"}.get(word, word)
                run.counts[key] = run.counts.get(key, 0) + int(n)
        if clean.startswith(("FAILED ", "ERROR ")):
            run.failures.append(clean)
        phase = PHASE.match(clean)
        if phase:
            starts[phase.group(1)] = int(phase.group(2))
            phase_now = phase.group(1)
        verdict = VERDICT.match(clean)
        if verdict:
            run.checks[verdict.group(1)] = verdict.group(2) or f"NOT RUN: {verdict.group(3)}"
    if "ruff" in starts:
        starts = {"setup": 0, **starts}  # "[test] ruff (setup took N s)": setup ran from 0 to N
        names = list(starts)
        run.phases_s = {a: starts[b] - starts[a] for a, b in itertools.pairwise(names)}


def stop_group(proc: subprocess.Popen[bytes], grace: float = 60) -> None:
    """Ctrl-C to the run's process group (pytest and the checks clean up), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def one_run(run: Run, base: Path, env: dict[str, str], test_args: list[str], guardian: Guardian) -> None:
    clone = base / f"clone-{run.n}"
    log_path = base / f"run-{run.n}.log"
    run.log = str(log_path)
    t0 = time.monotonic()
    guardian.watch(clone)
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(REPO), str(clone)], check=True)
    if subprocess.run(
        ["git", "-C", str(clone), "cat-file", "-e", run.commit], capture_output=True, check=False
    ).returncode:
        subprocess.run(["git", "-C", str(clone), "fetch", "-q", str(REPO), run.commit], check=True)  # no ref names it
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", "--detach", run.commit], check=True)
    run.clone_s = time.monotonic() - t0
    log(f"run {run.n}: scripts/test {' '.join(test_args)} in {clone} (log: {log_path})")
    t0 = time.monotonic()
    try:
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                ["scripts/test", *test_args],
                cwd=clone,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop_group() stops all of it
            )
            guardian.watch(proc.pid)  # if we die, the guardian stops this run's process group
            try:
                run.exit_status = proc.wait()
            finally:
                stop_group(proc)  # only when interrupted: it has exited otherwise
                guardian.watch(proc.pid, on=False)
    finally:
        run.duration_s = time.monotonic() - t0
        run.loadavg_end = os.getloadavg()[0]
        parse_output(log_path.read_text(errors="replace"), run)
        shutil.rmtree(clone, ignore_errors=True)
        guardian.watch(clone, on=False)


# -- report ------------------------------------------------------------------------------------------------------


def verdict(run: Run, check: str) -> str:
    return run.checks.get(check, "-").split(":")[0]  # PASSED, FAILED or NOT RUN (the reason is in the JSON)


def table(runs: list[Run]) -> str:
    rows = [("run", "exit", "passed", "failed", "errors", "skipped", "py310_check", "arm_check", "time")]
    for r in runs:
        c = r.counts
        rows.append(
            (
                str(r.n), "-" if r.exit_status is None else str(r.exit_status), str(c.get("passed", 0)),
                str(c.get("failed", 0)), str(c.get("errors", 0)), str(c.get("skipped", 0)),
                verdict(r, "py310_check"), verdict(r, "arm_check"),
                f"{r.duration_s / 60:.1f} min",
            )
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    for r in runs:
        if r.phases_s:
            lines.append(f"  run {r.n} phases: " + ", ".join(f"{k} {v} s" for k, v in r.phases_s.items()))
        lines += [f"  run {r.n}: {f}" for f in r.failures]
    return "\n".join(lines)


def machine() -> dict[str, object]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {"cpus": os.cpu_count(), "cpu": model, "arch": platform.machine(), "mem_gib": round(mem_kb / 2**20, 1)}


def resolve_commit(ref: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"scripts/stress_test: no commit {ref!r} in {REPO}")
    return out.stdout.strip()


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    test_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, test_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="scripts/stress_test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="how many runs in a row (default 3)")
    parser.add_argument("--load", type=int, default=2, help="CPU hog workers (default 2; 0: no hog)")
    parser.add_argument("--commit", default="HEAD", help="what to clone and test (default: HEAD of this checkout)")
    parser.add_argument("--json", type=Path, help="write the per-run results here")
    parser.add_argument("--pytest-only", action="store_true", help="skip py310_check and arm_check (self-checks)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.load < 0:
        parser.error("--runs must be >= 1 and --load >= 0")
    return args, test_args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--guard"]:
        return guard(sys.stdin)
    args, test_args = parse_args(argv)
    commit = resolve_commit(args.commit)
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "-uno"], capture_output=True, text=True, check=False
    )
    if args.commit == "HEAD" and dirty.stdout.strip():
        log("note: this checkout has uncommitted changes; the clones test the commit, without them")
    env = {**os.environ}
    env.setdefault("EDGEFLEET_CACHE", str(Path.home() / ".cache" / "edgefleet"))  # shared: models fetched once
    env.pop("VIRTUAL_ENV", None)
    if args.pytest_only:
        env.update({"EDGEFLEET_PY310_CHECK": "0", "EDGEFLEET_ARM_CHECK": "0"})
    handlers: dict[signal.Signals, Callable[..., object] | int | None] = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        handlers[sig] = signal.signal(sig, _on_signal)
    runs: list[Run] = []
    started = time.time()
    interrupted: Interrupted | None = None
    base = Path(tempfile.mkdtemp(prefix="edgefleet-stress-"))
    log(f"commit {commit[:12]}, {args.runs} runs, logs in {base}")
    hog = "none"
    guardian = Guardian()
    try:
        with cpu_hog(args.load, guardian) as hog:
            for n in range(1, args.runs + 1):
                run = Run(n, commit)
                runs.append(run)
                one_run(run, base, env, test_args, guardian)
                summary = run.summary or "no pytest summary"
                log(f"run {n}: exit {run.exit_status}, {summary}, {run.duration_s:.0f} s, load {run.loadavg_end:.1f}")
    except Interrupted as exc:
        interrupted = exc
        log(f"interrupted ({exc})")
    finally:
        guardian.close()
        for signum, old in handlers.items():
            signal.signal(signum, old)
    print(table(runs), flush=True)
    ok = interrupted is None and len(runs) == args.runs and all(r.passed for r in runs)
    if args.json is not None:
        report = {
            "ok": ok,
            "commit": commit,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "runs_requested": args.runs,
            "load": {"workers": args.load, "hog": hog},
            "test_args": test_args,
            "pytest_only": args.pytest_only,
            "machine": machine(),
            "runs": [{**asdict(r), "passed": r.passed} for r in runs],
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    passed = sum(r.passed for r in runs)
    print(f"stress_test: {passed}/{args.runs} runs passed under {hog}{' (interrupted)' if interrupted else ''}")
    if interrupted is not None:
        return 128 + interrupted.signum
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
