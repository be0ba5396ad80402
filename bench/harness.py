"""Plumbing for the benchmarks: gunicorn processes, wrk, a bounded HTTP client pool, worker memory.

Everything listens and connects on 127.0.0.1 only, and every load loop is
bounded both in count and in time.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
GUNICORN = Path(sys.executable).parent / "gunicorn"
HOST = "127.0.0.1"
START_TIMEOUT = 60.0
POLL_INTERVAL = 0.005


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- gunicorn


@dataclass
class Server:
    """One `gunicorn -c etc/gunicorn.conf.py <app>` on a free loopback port, as production starts it (or, without
    `config`, a plain `gunicorn --bind <port> <app>`)."""

    name: str
    app: str  # "wsgi:app" or "bare_app:app"
    home: Path
    log_path: Path
    workers: int = 2
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    checkout: Path = REPO  # the source tree served: this one, or an older commit's worktree (a baseline)
    # None: gunicorn's defaults (its own sync worker, nothing of the service's configuration), bound to `port`,
    # the app loaded before the workers fork (as the service loads it)
    config: str | None = "etc/gunicorn.conf.py"
    process: subprocess.Popen | None = None
    started_in: float = 0.0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, ready_path: str = "/ping") -> Server:
        """Spawn gunicorn and wait for a 200 on `ready_path`; `started_in` is spawn-to-first-200 seconds."""
        env = {
            **os.environ,
            "KUIPER_HOME": str(self.home),
            "KUIPER_PLUGINS__BASIC__RESTPORT": str(self.port),
            # A baseline checkout from before the service had its own prefix reads its port from eKuiper's
            # variable; this checkout reads that one only from an engine's kuiper.yaml, which no bench home has.
            "KUIPER__BASIC__RESTPORT": str(self.port),
            "WEB_CONCURRENCY": str(self.workers),
            **({"PYTHONPATH": str(self.checkout)} if self.checkout != REPO else {}),
            **self.env,
        }
        options = ["-c", self.config] if self.config else ["--bind", f"{HOST}:{self.port}", "--preload"]
        if self.app.startswith("bare_app"):
            options += ["--pythonpath", str(BENCH)]
        log = open(self.log_path, "ab")
        try:
            began = time.perf_counter()
            self.process = subprocess.Popen(
                [str(GUNICORN), *options, self.app],
                cwd=self.checkout, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = began + START_TIMEOUT
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name}: gunicorn exited with {self.process.returncode}:\n{self.log_tail()}")
            if status_of(self.port, "GET", ready_path) == 200:
                self.started_in = time.perf_counter() - began
                return self
            time.sleep(POLL_INTERVAL)
        self.stop()
        raise RuntimeError(f"{self.name}: no 200 on {ready_path} within {START_TIMEOUT:.0f}s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the master and its live workers."""
        master = psutil.Process(self.process.pid)
        return _cpu_seconds([master, *master.children()])

    def worker_pids(self) -> list[int]:
        return [child.pid for child in psutil.Process(self.process.pid).children()]

    def wait_workers_settled(self, timeout: float = 15.0) -> list[int]:
        """Wait until every worker exists and its RSS has stopped growing (it has imported the app)."""
        deadline = time.monotonic() + timeout
        previous: dict[int, int] = {}
        while time.monotonic() < deadline:
            pids = self.worker_pids()
            current = {pid: rss_kib(pid) for pid in pids}
            if len(pids) == self.workers and current == previous:
                return pids
            previous = current
            time.sleep(0.25)
        raise RuntimeError(f"{self.name}: workers did not settle within {timeout:.0f}s")

    def stop(self) -> None:
        """SIGTERM the gunicorn session we started (master and workers), SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def tracebacks(self) -> int:
        try:
            return self.log_path.read_text(errors="replace").count("Traceback")
        except FileNotFoundError:
            return 0


@dataclass(frozen=True)
class Process:
    """Any process the bench measures beside gunicorn (kuiperd)."""

    pid: int

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the process and its children."""
        process = psutil.Process(self.pid)
        return _cpu_seconds([process, *process.children(recursive=True)])


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU time of the processes still alive."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def status_of(port: int, method: str, path: str, timeout: float = 1.0) -> int | None:
    """One request on a fresh connection; the status, or None when nothing answers."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def _call(base: str, method: str, path: str, body: bytes | None, timeout: float) -> int:
    """One request to `base` (http://127.0.0.1:PORT) on a fresh connection; its status."""
    port = int(base.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def post_json(base: str, path: str, body: dict, timeout: float = 300) -> int:
    """POST a JSON body; the status."""
    return _call(base, "POST", path, json.dumps(body).encode(), timeout)


def delete(base: str, path: str, timeout: float = 120) -> int:
    """DELETE; the status."""
    return _call(base, "DELETE", path, None, timeout)


def fetch_body(port: int, path: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


# ---------------------------------------------------------------- wrk


@dataclass(frozen=True)
class WrkRun:
    requests_per_second: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx answers plus socket errors


_LATENCY_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _latency_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(match[1]) * _LATENCY_UNITS[match[2]] if match else float("nan")


def ensure_wrk() -> str:
    """Return wrk's path, installing the Debian package first when it is missing (needs root)."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit("bench: wrk is missing and only root can install it: apt-get install wrk")
    print("bench: installing wrk (apt-get)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL)
    found = shutil.which("wrk")
    if not found:
        sys.exit("bench: apt-get installed wrk but it is not on PATH")
    return found


def wrk(url: str, seconds: float, connections: int = 4, threads: int = 1) -> WrkRun:
    """Load `url` for `seconds` with wrk (a bounded run) and parse its summary."""
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(int(round(seconds)), 1)}s",
               "--timeout", "10s", "--latency", url]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    if not (rps and total and p50 and p99):
        raise RuntimeError(f"cannot parse wrk's output:\n{output}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        errors += int(non_2xx[1])
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if socket_errors:
        errors += sum(int(count) for count in socket_errors.groups())
    return WrkRun(float(rps[1]), int(total[1]), _latency_ms(p50[1]), _latency_ms(p99[1]), errors)


# ---------------------------------------------------------------- a bounded client pool


@dataclass(frozen=True)
class PoolRun:
    done: int
    failed: int
    seconds: float
    latencies_ms: list[float]
    first_failure: str

    @property
    def per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def request_pool(
    port: int, requests: Iterable[tuple[str, str, bytes]], clients: int, expected: int, time_limit: float
) -> PoolRun:
    """Send (method, path, body) requests from `clients` threads, each on a fresh connection.

    Stops after the last request or at `time_limit` seconds, whichever comes first.
    """
    todo = list(requests)
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    deadline = time.perf_counter() + time_limit

    def client() -> None:
        while time.perf_counter() < deadline:
            with lock:
                if not todo:
                    return
                method, path, body = todo.pop()
            began = time.perf_counter()
            conn = http.client.HTTPConnection(HOST, port, timeout=max(deadline - began, 0.1))
            try:
                conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                answer = response.read()
                status = response.status
            except OSError as exc:
                status, answer = None, repr(exc).encode()
            finally:
                conn.close()
            elapsed = (time.perf_counter() - began) * 1000
            with lock:
                if status == expected:
                    latencies.append(elapsed)
                else:
                    failures.append(f"{status}: {answer[:300]!r}")

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=time_limit + 30)
    seconds = time.perf_counter() - began
    return PoolRun(len(latencies), len(failures) + len(todo), seconds, latencies, failures[0] if failures else "")


def thread_pool(tasks: list[Callable[[], None]], workers: int, time_limit: float) -> float:
    """Run the callables on `workers` threads, bounded by `time_limit`; return the seconds taken."""
    todo = list(tasks)
    lock = threading.Lock()
    errors: list[BaseException] = []
    deadline = time.perf_counter() + time_limit

    def worker() -> None:
        while time.perf_counter() < deadline:
            with lock:
                if not todo or errors:
                    return
                task = todo.pop()
            try:
                task()
            except BaseException as exc:  # reported to the caller below
                with lock:
                    errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=time_limit + 30)
    if errors:
        raise errors[0]
    if todo:
        raise RuntimeError(f"{len(todo)} tasks left undone after {time_limit:.0f}s")
    return time.perf_counter() - began


# ---------------------------------------------------------------- memory and disk


def workers_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by these processes and the children they have reaped."""
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system + times.children_user + times.children_system
    return total


def rss_kib(pid: int) -> int:
    return _status_field(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    return _status_field(pid, "VmHWM")


def _status_field(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except FileNotFoundError:
        return 0
    return 0


def smaps_rollup(pid: int) -> dict[str, int]:
    """The kernel's memory totals of a process (/proc/<pid>/smaps_rollup), in KiB: Rss, Pss, Private_Dirty..."""
    totals: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
        for line in rollup:
            fields = line.split()
            if len(fields) == 3 and fields[2] == "kB":
                totals[fields[0].rstrip(":")] = int(fields[1])
    return totals


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where the kernel refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Sample the RSS of some processes every few milliseconds in a thread: the fallback peak meter."""

    def __init__(self, pids: list[int], interval: float = 0.005):
        self.pids = pids
        self.interval = interval
        self.peaks = {pid: rss_kib(pid) for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for pid in self.pids:
                self.peaks[pid] = max(self.peaks[pid], rss_kib(pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run_measured(command: list[str], timeout: float = 300) -> int:
    """Run a command to completion, failing on a non-zero exit; return its peak RSS in KiB."""
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"{command[0]} took longer than {timeout:.0f}s")
        time.sleep(0.001)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}")
    return usage.ru_maxrss


def sync() -> None:
    subprocess.run(["sync"], check=True, timeout=300)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- the machine


def machine() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    versions = {}
    for package in ("flask", "gunicorn", "werkzeug", "marshmallow"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # a missing package is reported as such
            versions[package] = "?"
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "wrk": wrk_version.split(" Copyright")[0].strip(),
    }


def filesystem_of(path: Path) -> str:
    """The mount holding `path`, as /proc/mounts names it (type and device)."""
    best, found = "", "unknown"
    real = os.path.realpath(path)
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            device, mount_point, fs_type = line.split()[:3]
            if (real == mount_point or real.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) > len(best):
                best, found = mount_point, f"{fs_type} on {device} ({mount_point})"
    return found


def eatmydata_library() -> str:
    """The path of libeatmydata (Debian's eatmydata), which turns fsync and friends into no-ops."""
    found = sorted(glob.glob("/usr/lib/*/libeatmydata.so*")) + sorted(glob.glob("/usr/lib/libeatmydata.so*"))
    if not found:
        raise RuntimeError("libeatmydata is missing: install Debian's eatmydata (make bench does)")
    return found[0]


@contextmanager
def checkout_of(revision: str, where: Path) -> Iterator[Path]:
    """A detached worktree of this repository at `revision`, removed afterwards (a same-run baseline)."""
    add_worktree(revision, where)
    try:
        yield where
    finally:
        remove_worktree(where)


def add_worktree(revision: str, where: Path) -> Path:
    """Check `revision` out, detached, into `where` (a worktree of this repository)."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(where), revision],
                   check=True, timeout=120, capture_output=True)
    return where


def remove_worktree(where: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)], timeout=120,
                   capture_output=True)
