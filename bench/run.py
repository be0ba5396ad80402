"""`make bench`: the service's figures as ratios against baselines measured in the same run.

1. Reads: GET list, describe, udfs and udfs/<f> with a small and a large registry, under the
   production gunicorn configuration, loaded by wrk; baseline: bench/bare_app.py (the same JSON
   from memory) under the same configuration.
2. One large install: a 64 MiB incompressible plugin by file:// from data/uploads, against
   `unzip` of the same zip into a fresh folder, both followed by `sync`; and the worker's peak RSS
   growth during the install.
3. Many small installs: 200 distinct source plugins, 4 concurrent clients, 2 workers; baselines:
   `unzip` + `mv` of the same 200 zips with the same concurrency, and the bare app answering the
   same POST.
4. Cold start: spawning gunicorn to the first 200 on /plugins/sources with the large registry,
   against the bare app.
5. One many-file install: a Python portable plugin of 9,990 small files in 20 folders (its
   dependencies vendored), handshake checked, by file:// from data/uploads, then `sync`, against
   `unzip -q` of the same zip into a fresh folder, then `sync`.
6. Against kuiperd: the same plugins installed in eKuiper's own engine (kuiperd, built as the tests
   build it) and in the service; the four reads loaded alike, in turns; each side's idle memory (PSS);
   one small native install through each side's API.

Prints a table and writes bench/RESULTS.md (or --out). `--smoke` runs everything with tiny sizes,
only to show that the benchmark still runs. Exits 0 whether targets are met or not: a benchmark
reports, tests assert.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import harness
import kuiperd
from fixtures import Population, populate, write_many_files_portable_zip, write_source_zip
from harness import Server, median, sync, wrk

MIB = 1 << 20


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark is; `full` is the issue's, `smoke` only proves the bench still runs."""

    small_registry: int
    large_registry: int
    read_seconds: float
    read_rounds: int
    warmup_seconds: float
    large_install_bytes: int
    large_install_reps: int
    small_installs: int
    install_rounds: int
    bare_posts: int
    cold_start_reps: int
    many_files: int
    many_files_reps: int
    engine_install_reps: int = 5
    clients: int = 4
    workers: int = 2
    wrk_connections: int = 4


FULL = Sizes(
    small_registry=200, large_registry=10_000, read_seconds=5, read_rounds=3, warmup_seconds=1,
    large_install_bytes=64 * MIB, large_install_reps=3, small_installs=200, install_rounds=5, bare_posts=1000,
    cold_start_reps=3, many_files=9_990, many_files_reps=5,
)
SMOKE = Sizes(
    small_registry=20, large_registry=200, read_seconds=1, read_rounds=1, warmup_seconds=0,
    large_install_bytes=1 * MIB, large_install_reps=1, small_installs=12, install_rounds=1, bare_posts=24,
    cold_start_reps=1, many_files=300, many_files_reps=1, engine_install_reps=1,
)
# The reads asked of both kuiperd and the service, as the issue names them.
ENGINE_READS = {
    "GET /plugins/sources": "/plugins/sources",
    "GET /plugins/sources/random": "/plugins/sources/random",
    "GET /plugins/functions": "/plugins/functions",
    "GET /plugins/udfs": "/plugins/udfs",
}
IDLE_SECONDS = 3  # quiet after the reads before each side's memory is read
FLOOR_READS = 200  # rounds of three reads given the design's floor (bare_app.py) before its memory is read


@dataclass
class Row:
    """One line of the results table."""

    section: str
    what: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_what: str = ""
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return self.value / self.baseline


# The last commit before the install path was made durable (issue 9): the same-run baseline of its cost.
BEFORE_DURABLE = "77afb4452c89ff6f9d3c58b937463ff1970ee59b"
# The last commit before callers were identified and slow clients held off (issue 10): the same-run
# baseline of what those cost the reads (it runs gunicorn's sync worker and checks no caller).
BEFORE_ACCESS = "c373eaa230f467a818dec2dedf464052397aca6b"
# The bare app's transport for the reads: connections kept open between requests, as the service keeps them.
BARE_KEEP_ALIVE = "--worker-class gthread --threads 4 --keep-alive 10"


class Bench:
    def __init__(self, sizes: Sizes, work: Path):
        self.sizes = sizes
        self.work = work
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.servers: list[Server] = []
        self.timings: dict[str, float] = {}
        self.load_averages = [os.getloadavg()]
        self.cpu_per_request: dict[tuple[int, str, str], float] = {}
        self.engine_cpu: dict[tuple[str, str], float] = {}  # (read, side) -> best CPU µs per request

    # ------------------------------------------------------------ plumbing

    def server(self, name: str, app: str, home: Path, config: str | None = Server.config, **env: str) -> Server:
        server = Server(name=name, app=app, home=home, log_path=self.work / f"{name}.log",
                        workers=self.sizes.workers, env=env, config=config)
        self.servers.append(server)
        return server

    def bare(self, name: str, population: Population, keep_alive: bool = False, plain: bool = False) -> Server:
        """The bare Flask app; with `keep_alive`, under gunicorn's gthread worker, which keeps connections open
        as the service does for reads (the same transport), instead of our worker's one request per connection;
        `plain`, under gunicorn's defaults and sync worker, without the service's configuration file."""
        home = self.work / f"{name}-home"
        home.mkdir(exist_ok=True)
        data = population.write_bare_data(self.work / f"{name}.json")
        env = {"BENCH_BARE_DATA": str(data)}
        if keep_alive:
            env["GUNICORN_CMD_ARGS"] = BARE_KEEP_ALIVE
        return self.server(name, "bare_app:app", home, config=None if plain else Server.config, **env)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()

    def section(self, title: str):
        print(f"\n== {title}", flush=True)
        self.timings[title] = time.perf_counter()

    # ------------------------------------------------------------ 1. reads

    def reads(self) -> None:
        """Start the service and the bare app for both registry sizes at once, then load them in turn.

        Taking the four in turn within each round keeps every comparison (service against bare app,
        small against large registry) inside the same few seconds of the machine's life.
        """
        sizes = self.sizes
        self.section(f"reads, {sizes.small_registry} and {sizes.large_registry} plugins")
        targets: list[tuple[int, str, Server, str]] = []  # (size, endpoint, server, path)
        checkout = self.work / "checkout-before-access"
        harness.add_worktree(BEFORE_ACCESS, checkout)
        for size in (sizes.small_registry, sizes.large_registry):
            began = time.perf_counter()
            population = populate(self.work / f"reads-{size}", size)
            print(f"registered {size} sources and {len(population.functions)} functions"
                  f" in {time.perf_counter() - began:.1f}s", flush=True)
            if size == sizes.large_registry:
                self.large_population = population
            service = self.server(f"service-{size}", "wsgi:app", population.home).start()
            bare = self.bare(f"bare-{size}", population, keep_alive=True).start()
            paths = {
                "list": "/plugins/sources",
                "describe": f"/plugins/sources/{population.probe_source}",
                "udfs": "/plugins/udfs",
                "udfs-one": f"/plugins/udfs/{population.probe_function}",
            }
            self._same_bodies(service, bare, paths)
            targets += [(size, endpoint, server, path) for endpoint, path in paths.items()
                        for server in (service, bare)]
            if size == sizes.small_registry:
                # The same registry written by that commit's own fixtures (its schema is older).
                before_home = self.work / f"reads-{size}-before-access"
                subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                                f"sys.path[:0] = [{str(checkout)!r}, {str(checkout / 'bench')!r}]; "
                                f"from fixtures import populate; populate(Path({str(before_home)!r}), {size})"],
                               check=True, timeout=300)
                before = self.server(f"before-{size}", "wsgi:app", before_home)
                before.checkout = checkout
                before.start()
                self._same_bodies(service, before, {k: paths[k] for k in ("list", "describe")})
                targets += [(size, endpoint, before, paths[endpoint]) for endpoint in ("list", "describe")]
        try:
            best = self._load(targets)
        finally:
            for server in {id(t[2]): t[2] for t in targets}.values():
                server.stop()
            harness.remove_worktree(checkout)

        def rps(size: int, endpoint: str, kind: str) -> float:
            return best[(size, endpoint, f"{kind}-{size}")]

        small, large = sizes.small_registry, sizes.large_registry
        for endpoint in ("list", "describe", "udfs", "udfs-one"):
            self.add(Row(f"reads, {small} plugins", f"GET {endpoint}", rps(small, endpoint, "service"), "req/s",
                         rps(small, endpoint, "bare"), "bare app", "≥ 0.9x bare",
                         rps(small, endpoint, "service") >= 0.9 * rps(small, endpoint, "bare")))
        for endpoint in ("list", "describe"):
            self.add(Row(f"reads, {small} plugins", f"GET {endpoint} (vs before issue 10)",
                         rps(small, endpoint, "service"), "req/s", rps(small, endpoint, "before"),
                         f"code before issue 10 ({BEFORE_ACCESS[:8]}), sync worker"))
        label = f"reads, {large} plugins"
        for endpoint in ("list", "describe", "udfs", "udfs-one"):
            service_rps, bare_rps = rps(large, endpoint, "service"), rps(large, endpoint, "bare")
            if endpoint in ("describe", "udfs-one"):
                small_rps = rps(small, endpoint, "service")
                self.add(Row(label, f"GET {endpoint}", service_rps, "req/s", small_rps,
                             f"service at {small}", "≥ 0.85x (within 15%)", service_rps >= 0.85 * small_rps))
                self.add(Row(label, f"GET {endpoint} (vs bare)", service_rps, "req/s", bare_rps, "bare app"))
            elif endpoint == "list":
                self.add(Row(label, "GET list", service_rps, "req/s", bare_rps, "bare app", "≥ 0.8x bare",
                             service_rps >= 0.8 * bare_rps))
            else:
                self.add(Row(label, f"GET {endpoint}", service_rps, "req/s", bare_rps, "bare app"))

    def _same_bodies(self, service: Server, bare: Server, paths: dict[str, str]) -> None:
        """The baseline is only a baseline if it answers the very same bytes."""
        for endpoint, path in paths.items():
            answers = [harness.fetch_body(server.port, path) for server in (service, bare)]
            if answers[0] != answers[1]:
                raise RuntimeError(
                    f"{endpoint}: the service and the bare app answer differently:\n"
                    f"  service {answers[0][0]} {answers[0][1]} {answers[0][2][:200]!r}\n"
                    f"  bare    {answers[1][0]} {answers[1][1]} {answers[1][2][:200]!r}"
                )

    def _load(self, targets: list[tuple[int, str, Server, str]]) -> dict[tuple[int, str, str], float]:
        """Best req/s of each (size, endpoint, server) over the rounds, taking the targets in turn."""
        sizes = self.sizes
        best: dict[tuple[int, str, str], float] = {}
        for round_number in range(sizes.read_rounds):
            print(f"  round {round_number + 1} of {sizes.read_rounds}", flush=True)
            for size, endpoint, server, path in targets:
                if round_number == 0 and sizes.warmup_seconds:
                    wrk(server.url + path, sizes.warmup_seconds, sizes.wrk_connections)
                cpu_before = server.cpu_seconds()
                run = wrk(server.url + path, sizes.read_seconds, sizes.wrk_connections)
                cpu_us = (server.cpu_seconds() - cpu_before) * 1e6 / max(run.requests, 1)
                if run.errors:
                    raise RuntimeError(f"{server.name} {path}: {run.errors} errors under load")
                key = (size, endpoint, server.name)
                best[key] = max(best.get(key, 0.0), run.requests_per_second)
                self.cpu_per_request[key] = min(self.cpu_per_request.get(key, float("inf")), cpu_us)
                print(f"  {server.name:14} {endpoint:9} {run.requests_per_second:9.1f} req/s"
                      f"  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  {cpu_us:7.0f} µs CPU/req"
                      f"  ({run.requests} requests)", flush=True)
        return best

    # ------------------------------------------------------------ 2. one large install

    def large_install(self) -> None:
        sizes = self.sizes
        self.section(f"one large install, {sizes.large_install_bytes // MIB} MiB")
        home = self.work / "large-install"
        populate(home, 0)
        uploads = home / "data" / "uploads"
        package = write_source_zip(uploads / "big.zip", "big", sizes.large_install_bytes)
        body = json.dumps({"name": "big", "file": f"file://{package}"}).encode()
        service = self.server("service-large-install", "wsgi:app", home).start()
        unzip_times, install_times, growths, unzip_peaks = [], [], [], []
        try:
            pids = service.wait_workers_settled()
            sync()
            for rep in range(sizes.large_install_reps):
                folder = self.work / f"unzip-{rep}"
                began = time.perf_counter()
                unzip_peaks.append(harness.run_measured(["unzip", "-q", str(package), "-d", str(folder)]) / 1024)
                sync()
                unzip_times.append(time.perf_counter() - began)
                shutil.rmtree(folder)
                sync()

                before = {pid: harness.rss_kib(pid) for pid in pids}
                exact = all(harness.reset_peak_rss(pid) for pid in pids)
                with harness.RssSampler(pids) as sampler:
                    began = time.perf_counter()
                    run = harness.request_pool(service.port, [("POST", "/plugins/sources", body)], 1, 201, 300)
                    sync()
                    install_times.append(time.perf_counter() - began)
                if run.failed:
                    raise RuntimeError(f"large install failed: {run.first_failure}")
                peaks = {pid: harness.peak_rss_kib(pid) if exact else sampler.peaks[pid] for pid in pids}
                growths.append(max(peaks[pid] - before[pid] for pid in pids) / 1024)
                print(f"  rep {rep}: unzip+sync {unzip_times[-1]:.3f}s  install+sync {install_times[-1]:.3f}s"
                      f"  worker peak RSS growth {growths[-1]:.1f} MB"
                      f" ({'VmHWM' if exact else 'sampled'})", flush=True)
                if harness.status_of(service.port, "DELETE", "/plugins/sources/big", timeout=60) != 200:
                    raise RuntimeError("could not delete the large plugin between repetitions")
                sync()
        finally:
            service.stop()
        section = f"one large install, {sizes.large_install_bytes // MIB} MiB"
        install, unzip = median(install_times), median(unzip_times)
        self.add(Row(section, "install + sync (median)", install, "s", unzip, "unzip + sync", "≤ 1.2x",
                     install <= 1.2 * unzip))
        growth = max(growths)
        self.add(Row(section, "worker peak RSS growth (max)", growth, "MB", max(unzip_peaks),
                     "unzip's peak RSS", "≤ 16 MB", growth <= 16))

    # ------------------------------------------------------------ 3. many small installs

    def small_installs(self) -> None:
        sizes = self.sizes
        count = sizes.small_installs
        self.section(f"{count} small installs, {sizes.clients} clients")
        home = self.work / "small-installs"
        populate(home, 0)
        uploads = home / "data" / "uploads"
        names = [f"small{i:04d}" for i in range(count)]
        packages = [write_source_zip(uploads / f"{name}.zip", name, 16 * 1024) for name in names]
        sync()

        # Baseline 1: the file-system work any installer must do, unzip + mv, with the same concurrency.
        floor_root = self.work / "unzip-mv"
        (floor_root / "installed").mkdir(parents=True)

        def unzip_and_move(index: int, package: Path) -> None:
            staging = floor_root / f"staging-{index}"
            subprocess.run(["unzip", "-q", str(package), "-d", str(staging)], check=True, timeout=60)
            for member in staging.iterdir():
                os.replace(member, floor_root / "installed" / member.name)
            staging.rmdir()

        seconds = harness.thread_pool(
            [lambda i=i, p=p: unzip_and_move(i, p) for i, p in enumerate(packages)], sizes.clients, 120
        )
        floor_rate = count / seconds
        print(f"  unzip + mv: {floor_rate:.1f} packages/s", flush=True)

        # Baseline 2: the bare app answering the same POST body, same client, same concurrency.
        bare = self.bare("bare-posts", Population(home, 0, {}, {})).start()
        try:
            bodies = [("POST", "/plugins/sources", json.dumps({"name": f"x{i}", "file": f"file://{packages[0]}"})
                       .encode()) for i in range(sizes.bare_posts)]
            bare_run = harness.request_pool(bare.port, bodies, sizes.clients, 201, 120)
        finally:
            bare.stop()
        if bare_run.failed:
            raise RuntimeError(f"bare POSTs failed: {bare_run.first_failure}")
        print(f"  bare app POST: {bare_run.per_second:.1f} req/s", flush=True)

        # Baselines 3 and 4, for what the durable steps cost: the same installs with fsync made a no-op
        # (eatmydata), and by the code before durability (BEFORE_DURABLE, issue 9's "today's figure") from a
        # worktree of that commit. The three run in turns, each on a fresh copy of the same home (the old code
        # on a home of its own: its registry schema is older); the median p50 of the rounds is compared.
        pristine = self.work / "small-installs-pristine"
        shutil.copytree(home, pristine)
        p50s: dict[str, list[float]] = {"durable": [], "unsynced": [], "before": []}
        run = None
        with harness.checkout_of(BEFORE_DURABLE, self.work / "checkout-before") as checkout:
            for round_number in range(sizes.install_rounds):
                order = ["durable", "unsynced", "before"]
                order = order[round_number % 3:] + order[:round_number % 3]
                for kind in order:
                    target = self.work / f"small-installs-{kind}-{round_number}"
                    if kind == "before":
                        (target / "data").mkdir(parents=True)
                        shutil.copytree(pristine / "data" / "uploads", target / "data" / "uploads")
                    else:
                        shutil.copytree(pristine, target)
                    done = self.install_run(
                        f"service-small-installs-{kind}-{round_number}", target, names, packages, home,
                        checkout=checkout if kind == "before" else None,
                        **({"LD_PRELOAD": harness.eatmydata_library()} if kind == "unsynced" else {}),
                    )
                    p50s[kind].append(done.percentile(0.5))
                    print(f"  round {round_number + 1}, {kind}: {done.per_second:.1f} installs/s"
                          f"  p50 {done.percentile(0.5):.1f} ms", flush=True)
                    if kind == "durable" and run is None:
                        run = done
        durable, unsynced, before = (median(p50s[k]) for k in ("durable", "unsynced", "before"))
        section = f"{count} small installs, {sizes.clients} clients"
        self.add(Row(section, "installs/s", run.per_second, "/s", floor_rate, "unzip + mv, same concurrency",
                     "≥ 50 /s", run.per_second >= 50))
        self.add(Row(section, "installs/s (vs bare POST)", run.per_second, "/s", bare_run.per_second,
                     "bare app POST, same client"))
        self.add(Row(section, "install latency p50", run.percentile(0.5), "ms",
                     bare_run.percentile(0.5), "bare app POST p50"))
        self.add(Row(section, "install latency p95", run.percentile(0.95), "ms",
                     bare_run.percentile(0.95), "bare app POST p95"))
        self.add(Row(section, "durable install latency p50 (median of rounds)", durable, "ms", before,
                     f"same installs, code before durability ({BEFORE_DURABLE[:8]})", "≤ 1.4x",
                     durable <= 1.4 * before))
        self.add(Row(section, "durable install latency p50 (vs no fsync)", durable, "ms", unsynced,
                     "same installs, fsync off (eatmydata)"))

    def install_run(self, name: str, home: Path, names: list[str], packages: list[Path], packages_home: Path,
                    checkout: Path | None = None, **env: str) -> harness.PoolRun:
        """Install every package once into `home`'s service (the packages are copied in with the home)."""
        count = len(names)
        server = self.server(name, "wsgi:app", home, **env)
        if checkout is not None:
            server.checkout = checkout
        service = server.start()
        try:
            service.wait_workers_settled()
            requests = [("POST", "/plugins/sources", json.dumps(
                {"name": plugin, "file": f"file://{home / package.relative_to(packages_home)}"}).encode())
                for plugin, package in zip(names, packages, strict=True)]
            run = harness.request_pool(service.port, requests, self.sizes.clients, 201, 300)
        finally:
            service.stop()
        if run.failed:
            raise RuntimeError(f"{run.failed} of {count} installs failed; first: {run.first_failure}")
        return run

    # ------------------------------------------------------------ 4. cold start

    def cold_start(self) -> None:
        sizes = self.sizes
        self.section(f"cold start, {sizes.large_registry} plugins")
        population = getattr(self, "large_population", None) or populate(
            self.work / f"reads-{sizes.large_registry}", sizes.large_registry
        )
        service_times, bare_times = [], []
        for rep in range(sizes.cold_start_reps):
            for name, times in (("service", service_times), ("bare", bare_times)):
                if name == "service":
                    server = self.server(f"service-cold-{rep}", "wsgi:app", population.home)
                else:
                    server = self.bare(f"bare-cold-{rep}", population)
                try:
                    server.start(ready_path="/plugins/sources")
                finally:
                    server.stop()
                times.append(server.started_in)
                print(f"  rep {rep}: {name:7} first 200 after {server.started_in:.3f}s", flush=True)
        section = f"cold start, {sizes.large_registry} plugins"
        service, bare = median(service_times), median(bare_times)
        self.add(Row(section, "spawn to first 200 on list (median)", service, "s", bare, "bare app",
                     "< 2 s", service < 2))

    # ------------------------------------------------------------ 5. one many-file install

    def many_files_install(self) -> None:
        """A portable plugin of many small files, installed and synced, against unzip and sync of its zip.

        The two alternate, each repetition starting with the other, so that the machine's drift falls on
        both. Nothing is removed until the last repetition: each installs a plugin of its own name and
        unzips into a folder of its own. ext4 skips inode numbers freed in the last half minute or so when it
        makes a file (recently_deleted), so making 10,000 files just after removing 10,000 costs several
        times the CPU, and would land on whichever side came next. Every worker has checked a small plugin's
        handshake before (`_warm_handshake_checks`).
        """
        sizes = self.sizes
        count = sizes.many_files
        section = f"one {count}-file portable install"
        self.section(section)
        home = self.work / "many-files"
        populate(home, 0)
        names = [f"vendored{rep}" for rep in range(sizes.many_files_reps)]
        packages = {name: write_many_files_portable_zip(home / "data" / "uploads" / f"{name}.zip", name, count)
                    for name in names}
        # The handshake check starts the plugin with a Python that has pynng, as an engine's pythonBin would.
        service = self.server("service-many-files", "wsgi:app", home,
                              KUIPER_PLUGINS__PORTABLE__PYTHONBIN=sys.executable).start()
        unzip_times: list[float] = []
        install_times: list[float] = []
        unzip_cpu: list[float] = []
        install_cpu: list[float] = []
        folders = [self.work / f"many-files-unzip-{rep}" for rep in range(sizes.many_files_reps)]
        try:
            workers = service.wait_workers_settled()
            self._warm_handshake_checks(service, home, workers)
            sync()
            for rep, (name, folder) in enumerate(zip(names, folders, strict=True)):
                for kind in (("unzip", "install") if rep % 2 == 0 else ("install", "unzip")):
                    if kind == "unzip":
                        began, cpu = time.perf_counter(), _children_cpu_seconds()
                        subprocess.run(["unzip", "-q", str(packages[name]), "-d", str(folder)], check=True,
                                       timeout=300)
                        unzip_cpu.append(_children_cpu_seconds() - cpu)
                        sync()
                        unzip_times.append(time.perf_counter() - began)
                    else:
                        body = json.dumps({"name": name, "file": f"file://{packages[name]}"}).encode()
                        began, cpu = time.perf_counter(), harness.workers_cpu_seconds(workers)
                        run = harness.request_pool(service.port, [("POST", "/plugins/portables", body)], 1, 201, 300)
                        install_cpu.append(harness.workers_cpu_seconds(workers) - cpu)
                        sync()
                        install_times.append(time.perf_counter() - began)
                        if run.failed:
                            raise RuntimeError(f"many-file install failed: {run.first_failure}")
                print(f"  rep {rep}: unzip+sync {unzip_times[-1]:.3f}s  install+sync {install_times[-1]:.3f}s"
                      f"  ({install_times[-1] / unzip_times[-1]:.2f}x)", flush=True)
            for name in names[:len(install_times)]:
                if harness.status_of(service.port, "DELETE", f"/plugins/portables/{name}", timeout=120) != 200:
                    raise RuntimeError(f"could not delete the many-file plugin {name}")
        finally:
            service.stop()
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
        install, unzip = median(install_times), median(unzip_times)
        self.add(Row(section, "install + sync (median)", install, "s", unzip, "unzip -q + sync", "≤ 1.2x",
                     install <= 1.2 * unzip))
        # What the machine's load cannot move much: the CPU each side used (the flushes' writeback is done by
        # the kernel's flusher threads for both, and counts for neither).
        self.add(Row(section, "CPU time, install (median)", median(install_cpu), "s", median(unzip_cpu),
                     "unzip -q's own CPU time; the install's: its worker's and its children's"))
        ratios = sorted(i / u for i, u in zip(install_times, unzip_times, strict=True))
        self.notes.append(
            f"{section}: install + sync {', '.join(f'{t:.2f}' for t in install_times)} s, unzip + sync"
            f" {', '.join(f'{t:.2f}' for t in unzip_times)} s; per repetition {ratios[0]:.2f}x to"
            f" {ratios[-1]:.2f}x")

    def _warm_handshake_checks(self, service: Server, home: Path, workers: list[int]) -> None:
        """Have every worker install (and delete) a 4-file portable plugin first, as in a service that has run.

        A worker's first handshake check also probes, once, whether plugins can be confined here (namespaces,
        a network of their own, nobody): a start-up cost, not what the section measures. One install per
        worker at once, so that each takes one; which worker did is read from the log (its pid), and the
        round is repeated, at most four times, until every worker has.
        """
        uploads = home / "data" / "uploads"
        for round_number in range(4):
            names = [f"warm{round_number}w{index}" for index in range(len(workers))]
            installs = [("POST", "/plugins/portables", json.dumps({
                "name": name, "file": f"file://{write_many_files_portable_zip(uploads / f'{name}.zip', name, 4)}",
            }).encode()) for name in names]
            run = harness.request_pool(service.port, installs, len(workers), 201, 120)
            if run.failed:
                raise RuntimeError(f"warm-up install failed: {run.first_failure}")
            for name in names:
                if harness.status_of(service.port, "DELETE", f"/plugins/portables/{name}", timeout=60) != 200:
                    raise RuntimeError(f"could not delete the warm-up plugin {name}")
            log = service.log_path.read_text(errors="replace")
            if all(f"[{pid}] [INFO] kuiper_plugins.engine.portable: portable plugin warm" in log for pid in workers):
                return
        raise RuntimeError("not every worker checked a plugin's handshake in four warm-up rounds")

    # ------------------------------------------------------------ 6. against kuiperd

    def against_engine(self) -> None:
        """The service against eKuiper's own plugin API in kuiperd, both holding the same plugins (issue 21)."""
        sizes = self.sizes
        section = f"against kuiperd, {len(kuiperd.PACKAGES)} plugins"
        self.section(section)
        packages = self.work / "engine-packages"
        build = kuiperd.build(packages)
        engine_home, home = self.work / "kuiperd-home", self.work / "engine-service-home"
        kuiperd.place(packages, home / "data" / "uploads")  # an empty home but for these
        engine = kuiperd.start(build, engine_home, self.work / "kuiperd.log")
        service = self.server("service-engine", "wsgi:app", home)
        try:
            kuiperd.place(packages, engine.uploads)
            service.start()
            for url, uploads in ((engine.url, engine.uploads), (service.url, home / "data" / "uploads")):
                for package in kuiperd.PACKAGES:
                    status = harness.post_json(url, f"/plugins/{package.plugin_type}", package.body(uploads))
                    if status != 201:
                        raise RuntimeError(f"installing {package.name} at {url}: {status}")
            self._same_contents(engine.url, service.url)
            engine_process = harness.Process(engine.process.pid)
            best: dict[tuple[str, str], float] = {}
            for round_number in range(sizes.read_rounds):
                print(f"  round {round_number + 1} of {sizes.read_rounds}", flush=True)
                # Turns alternate which side goes first, so that neither always meets the machine as the other left it.
                sides = [("kuiperd", engine.url, engine_process.cpu_seconds), ("service", service.url,
                                                                                 service.cpu_seconds)]
                for read, path in ENGINE_READS.items():
                    for side, url, cpu_seconds in (sides if round_number % 2 == 0 else sides[::-1]):
                        if round_number == 0 and sizes.warmup_seconds:
                            wrk(url + path, sizes.warmup_seconds, sizes.wrk_connections)
                        cpu_before = cpu_seconds()
                        run = wrk(url + path, sizes.read_seconds, sizes.wrk_connections)
                        cpu_us = (cpu_seconds() - cpu_before) * 1e6 / max(run.requests, 1)
                        if run.errors:
                            raise RuntimeError(f"{side} {path}: {run.errors} errors under load")
                        best[(read, side)] = max(best.get((read, side), 0.0), run.requests_per_second)
                        self.engine_cpu[(read, side)] = min(self.engine_cpu.get((read, side), float("inf")), cpu_us)
                        print(f"  {side:8} {read:28} {run.requests_per_second:9.1f} req/s  p50 {run.p50_ms:6.2f} ms"
                              f"  {cpu_us:7.0f} µs CPU/req  ({run.requests} requests)", flush=True)
            time.sleep(IDLE_SECONDS)  # idle: what each side holds when nothing asks it anything
            engine_memory = harness.smaps_rollup(engine.process.pid)
            service_pids = [service.process.pid, *service.worker_pids()]
            service_memory = [harness.smaps_rollup(pid) for pid in service_pids]
            engine_times, service_times = self._engine_installs(engine, service, home / "data" / "uploads")
        finally:
            service.stop()
            engine.stop()
        floor_pss = self._floor_pss()
        for read in ENGINE_READS:
            self.add(Row(section, read, best[(read, "service")], "req/s", best[(read, "kuiperd")], "kuiperd",
                         "≥ 1.0x kuiperd", best[(read, "service")] >= best[(read, "kuiperd")]))
        engine_pss, service_pss = engine_memory["Pss"] / 1024, sum(m["Pss"] for m in service_memory) / 1024
        self.add(Row(section, f"idle PSS, master + {len(service_pids) - 1} workers", service_pss, "MB", engine_pss,
                     "kuiperd's own", "≤ 0.6x kuiperd", service_pss <= 0.6 * engine_pss))
        self.add(Row(section, f"idle PSS of the design's floor: bare_app.py under gunicorn's own sync worker, master"
                              f" + {len(service_pids) - 1} workers (for reference)", floor_pss, "MB", engine_pss,
                     "kuiperd's own"))
        self.add(Row(section, "idle RSS (for reference: pages shared with other processes counted whole)",
                     sum(m["Rss"] for m in service_memory) / 1024, "MB", engine_memory["Rss"] / 1024, "kuiperd's own"))
        self.add(Row(section, "idle private memory (for reference: pages no other process maps)",
                     sum(m["Private_Clean"] + m["Private_Dirty"] for m in service_memory) / 1024, "MB",
                     (engine_memory["Private_Clean"] + engine_memory["Private_Dirty"]) / 1024, "kuiperd's own"))
        service_install, engine_install = median(service_times), median(engine_times)
        self.add(Row(section, "small native install (median), durable", service_install, "ms", engine_install,
                     "kuiperd's own install, not durable", "≤ 1.5x kuiperd", service_install <= 1.5 * engine_install))

    def _floor_pss(self) -> float:
        """Idle PSS (MB) of the least the design could be: gunicorn, with its own sync worker and the app preloaded,
        serving bench/bare_app.py (a Flask app of a few routes, no service code), read, then left as quiet."""
        population = Population(self.work / "floor-home", 1, {"random": "1.0.0"}, {"twice": "multi"})
        floor = self.bare("floor", population, plain=True).start()
        try:
            floor.wait_workers_settled()
            for _ in range(FLOOR_READS):
                for path in ("/plugins/sources", "/plugins/sources/random", "/plugins/udfs"):
                    harness.fetch_body(floor.port, path)
            time.sleep(IDLE_SECONDS)
            pids = [floor.process.pid, *floor.worker_pids()]
            total = sum(harness.smaps_rollup(pid)["Pss"] for pid in pids) / 1024
            print(f"  floor: {total:.1f} MB PSS (master + {len(pids) - 1} workers, {FLOOR_READS * 3} reads)",
                  flush=True)
            return total
        finally:
            floor.stop()

    def _same_contents(self, engine_url: str, service_url: str) -> None:
        """Both sides answer each read with 200 and the same content (kuiperd lists in its maps' random order)."""
        for read, path in ENGINE_READS.items():
            answers = [harness.fetch_body(int(url.rsplit(":", 1)[1]), path) for url in (engine_url, service_url)]
            contents = []
            for status, _type, body in answers:
                value = json.loads(body) if status == 200 else None
                contents.append(sorted(value) if isinstance(value, list) else value)
            if contents[0] is None or contents[0] != contents[1]:
                raise RuntimeError(f"{read}: kuiperd and the service answer differently: {answers}")

    def _engine_installs(self, engine, service: Server, uploads: Path) -> tuple[list[float], list[float]]:
        """One small native install, timed through each side's API in turns, each deleted before the next (ms)."""
        package = kuiperd.INSTALL_TIMED
        engine_times, service_times = [], []
        for url in (engine.url, service.url):  # the plugin is installed already on both sides: start without it
            harness.delete(url, f"/plugins/{package.plugin_type}/{package.name}")
        for rep in range(self.sizes.engine_install_reps):
            for side, url, side_uploads, times in (("kuiperd", engine.url, engine.uploads, engine_times),
                                                   ("service", service.url, uploads, service_times)):
                began = time.perf_counter()
                status = harness.post_json(url, f"/plugins/{package.plugin_type}", package.body(side_uploads))
                took = (time.perf_counter() - began) * 1000
                if status != 201:
                    raise RuntimeError(f"{side}: install {package.name}: {status}")
                times.append(took)
                if harness.delete(url, f"/plugins/{package.plugin_type}/{package.name}") != 200:
                    raise RuntimeError(f"{side}: could not delete {package.name} between repetitions")
                print(f"  rep {rep}: {side:8} install {took:7.1f} ms", flush=True)
        return engine_times, service_times

    # ------------------------------------------------------------ report

    def table(self) -> list[str]:
        header = ["section", "measurement", "service", "baseline", "ratio", "target", "met"]
        lines = [header]
        for row in self.rows:
            baseline = f"{_number(row.baseline)} {row.unit} ({row.baseline_what})" if row.baseline is not None else ""
            ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
            met = "" if row.met is None else ("yes" if row.met else "**NO**")
            lines.append([row.section, row.what, f"{_number(row.value)} {row.unit}", baseline, ratio, row.target, met])
        return [f"| {' | '.join(cells)} |" for cells in lines[:1]] + \
            [f"|{'|'.join('---' for _ in header)}|"] + \
            [f"| {' | '.join(cells)} |" for cells in lines[1:]]

    def cpu_table(self) -> list[str]:
        """Gunicorn CPU time (master + workers) per request, best round: less sensitive to other load."""
        lines = ["| registry | endpoint | service µs/req | bare app µs/req | bare / service |", "|---|---|---|---|---|"]
        for size in (self.sizes.small_registry, self.sizes.large_registry):
            for endpoint in ("list", "describe", "udfs", "udfs-one"):
                service = self.cpu_per_request.get((size, endpoint, f"service-{size}"))
                bare = self.cpu_per_request.get((size, endpoint, f"bare-{size}"))
                if service is None or bare is None:
                    continue
                lines.append(f"| {size} | GET {endpoint} | {service:.0f} | {bare:.0f} | {bare / service:.2f}x |")
        return lines

    def engine_cpu_table(self) -> list[str]:
        """CPU time per request against kuiperd: the service's gunicorn processes, and kuiperd's process."""
        lines = ["| read | service µs/req | kuiperd µs/req | kuiperd / service |", "|---|---|---|---|"]
        for read in ENGINE_READS:
            service, engine = self.engine_cpu.get((read, "service")), self.engine_cpu.get((read, "kuiperd"))
            if service is not None and engine is not None:
                lines.append(f"| {read} | {service:.0f} | {engine:.0f} | {engine / service:.2f}x |")
        return lines

    def console_table(self) -> str:
        widths = [28, 34, 14, 44, 7, 22, 6]
        out = []
        header = ["section", "measurement", "service", "baseline", "ratio", "target", "met"]
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        for row in self.rows:
            baseline = f"{_number(row.baseline)} {row.unit} ({row.baseline_what})" if row.baseline is not None else ""
            ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
            met = "" if row.met is None else ("yes" if row.met else "NO")
            cells = [row.section, row.what, f"{_number(row.value)} {row.unit}", baseline, ratio, row.target, met]
            out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
        return "\n".join(out)


def _children_cpu_seconds() -> float:
    """User + system CPU time of this process's children that have ended (unzip)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _number(value: float | None) -> str:
    if value is None:
        return ""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def write_report(bench: Bench, path: Path, command: str, mode: str, started: datetime.datetime,
                 seconds: float) -> None:
    sizes = bench.sizes
    info = harness.machine()
    met = [row for row in bench.rows if row.met is not None]
    missed = [row for row in met if not row.met]
    lines = [
        "# kuiper-plugins benchmark results",
        "",
        f"Written by `{command}` ({mode} sizes) on {started:%Y-%m-%d %H:%M} UTC; the run took {seconds:.0f} s.",
        "Every figure is a ratio against a baseline measured in the same run on the same machine.",
        "",
        "## Machine",
        "",
        f"- nproc: {info['nproc']}; CPU: {info['cpu']}; memory: {info['memory']}",
        f"- kernel {info['kernel']}; Python {info['python']}; {info['packages']}; {info['wrk']}",
        f"- work folder file system: {harness.filesystem_of(bench.work)}",
        "- load average (1, 5, 15 min) at the start: {}; at the end: {} (other work on the machine"
        " shows here; the ratios are taken against baselines measured alternately with the service"
        " to cancel most of it)".format(*(", ".join(f"{v:.2f}" for v in avg) for avg in bench.load_averages)),
        "",
        "## Results",
        "",
        f"Targets met: {len(met) - len(missed)} of {len(met)}"
        + (f"; missed: {', '.join(f'{r.section}: {r.what}' for r in missed)}." if missed else "."),
        "",
        *bench.table(),
        "",
        "CPU time of the gunicorn processes (master + workers) per request under the same wrk runs, best"
        " round. Other work on the machine slows req/s but barely changes this, so it corroborates the"
        " read ratios: `bare / service` is the req/s ratio the CPU cost alone would give.",
        "",
        *bench.cpu_table(),
        "",
        *(["CPU time per request against kuiperd, best round: the service's gunicorn processes (master + workers)"
           " and kuiperd's process, under the same wrk runs.", "", *bench.engine_cpu_table(), ""]
          if bench.engine_cpu else []),
        "## How each figure is measured",
        "",
        f"- **Reads.** `gunicorn -c etc/gunicorn.conf.py wsgi:app` with WEB_CONCURRENCY={sizes.workers} (the"
        " production configuration: kuiper-plugins' BufferingWorker, which answers a read the app answered since"
        " the last commit from the app's kept answer on a connection it keeps open; access log on, written to a"
        " file), against `bench/bare_app.py` under the same configuration file and worker count, with the same"
        " transport: kept connections, under gunicorn's gthread worker"
        f" (`{BARE_KEEP_ALIVE}`), since our worker keeps connections only for kept answers. The bare app"
        " serialises the same data with `json.dumps` per request; the bench checks before loading that both"
        " answer byte-identical bodies and the same Content-Type. Load: `wrk -t1"
        f" -c{sizes.wrk_connections} -d{sizes.read_seconds:g}s --latency <url>`, after a 1 s warm-up; service and"
        f" bare app alternate, {sizes.read_rounds} rounds, the best req/s of the rounds is kept. Any non-2xx answer"
        " or socket error aborts the bench. What issue 10 (callers identified by the kernel, our worker) cost the"
        f" reads: the {sizes.small_registry}-plugin list and describe are also asked of the code before it"
        f" (commit {BEFORE_ACCESS[:8]}, a worktree of this repository, gunicorn's sync worker, its own registry"
        " fixture) in the same rounds.",
        f"- **Registry fixture.** The {sizes.small_registry}- and {sizes.large_registry}-plugin registries are"
        " written straight into a temporary KUIPER_HOME with the project's own `db.initialise`, `db.transaction`"
        " and `registry.save` (the rows an install records, with its file list), plus each native plugin's .so"
        " on disk so start-up recovery sees a real installation; installing that many through the API would"
        " not be a read benchmark. N sources plus N/4 function plugins of 4 functions each, so `udfs` lists N"
        " names like `sources` does. Describe asks for the plugin in the middle of the sorted list.",
        f"- **One large install.** A {sizes.large_install_bytes // MIB} MiB random .so (incompressible, stored"
        " as `zip` stores what does not shrink) plus its yaml, in `data/uploads`, installed by `POST"
        " /plugins/sources` with a `file://` URL, then `sync`, against `unzip -q` of the same zip into a fresh"
        f" folder, then `sync`; median of {sizes.large_install_reps}, alternating, the plugin deleted and"
        " synced between repetitions. Peak RSS growth: each worker's VmHWM is reset through"
        " /proc/<pid>/clear_refs before the install (a sampling thread is the fallback), growth ="
        " VmHWM after - VmRSS before, largest over workers and repetitions; shown beside unzip's own peak RSS.",
        f"- **Many small installs.** {sizes.small_installs} distinct source plugins (16 KiB random .so + yaml)"
        f" from `data/uploads`, {sizes.clients} client threads each POSTing on a fresh connection,"
        f" {sizes.workers} workers. Baseline: `unzip` + `mv` into place of the same zips with the same"
        " concurrency, the file-system work any installer must do; the bare app answering the same POST with"
        f" the same client shows the HTTP ceiling. The cost of durability: the same {sizes.small_installs} installs"
        " by the code"
        f" before it (commit {BEFORE_DURABLE[:8]}, from a worktree of this repository) and by this code with"
        f" fsync made a no-op (eatmydata), {sizes.install_rounds} rounds taken in turns, each on a fresh copy"
        " of the same home; the medians of the rounds' p50 latencies are compared.",
        "- **Cold start.** Spawning the production gunicorn command to the first 200 on `/plugins/sources`"
        f" with the {sizes.large_registry}-plugin registry (polled every 5 ms), against the bare app holding"
        f" the same list; median of {sizes.cold_start_reps}.",
        f"- **One many-file install.** A Python portable plugin of {sizes.many_files} members (its descriptor,"
        " script and sink metadata, and small text modules of 256 B to 4 KiB in 20 vendored folders,"
        " deflated, no folder entries), installed by `POST /plugins/portables` with a `file://` URL from"
        " `data/uploads`, its handshake checked (portable.verifyOnInstall, the bench's Python as pythonBin),"
        " then `sync`, against `unzip -q` of the same zip into a fresh folder, then `sync`; median of"
        f" {sizes.many_files_reps}, the two alternating which goes first; each repetition installs a plugin of"
        " its own name and unzips into a folder of its own, all removed after the last (ext4 skips the inode"
        " numbers freed in the last half minute when it makes files, so 10,000 files made just after 10,000"
        " were removed cost several times the CPU). Before them, each worker has installed a 4-file portable"
        " plugin (a worker's first handshake check also probes once whether plugins can be confined). CPU time:"
        " the worker's user + system time, and its reaped"
        " children's (the handshake check, the second unpacking process), across the request, against unzip's"
        " own; neither side is charged"
        " for the writeback the flush waits for (the kernel's flusher threads do it). The notes give every"
        " repetition.",
        "- **Against kuiperd.** eKuiper's engine (kuiperd 2.4.0, built and started as the tests build and start it"
        " (kuiper_plugins.testing), cached per machine; loopback only) and the service (production gunicorn command,"
        f" WEB_CONCURRENCY={sizes.workers}) each get the same plugins through their own API, by file:// from"
        " their own data/uploads: " + ", ".join(f"{package.plugin_type}/{package.name}" for package in
                                               kuiperd.PACKAGES) + " (real Go plugins built against that"
        " engine). Both must answer the four reads with the same content (kuiperd lists in random order). Reads:"
        f" `wrk -t1 -c{sizes.wrk_connections} -d{sizes.read_seconds:g}s`, each read asked of both sides in turns"
        f" (which side goes first alternates by round), {sizes.read_rounds} rounds, best req/s kept; CPU per"
        " request of the service's gunicorn processes and of kuiperd's process, best round. Idle memory: after"
        f" the reads and {IDLE_SECONDS} s of quiet, PSS from /proc/<pid>/smaps_rollup of kuiperd's process and"
        " of the gunicorn master and its workers summed; PSS splits each shared page between the processes"
        " mapping it, so kuiperd's own figure drops when other kuiperd processes run on the machine (RSS and"
        " private memory are shown beside it). The design's floor, for reference: once both sides have stopped,"
        " plain `gunicorn --bind --preload` (its own sync worker, no configuration file, no service code; the app"
        " loaded in the master before the workers fork, as the service's is) with"
        f" the same worker count serving bench/bare_app.py, given {FLOOR_READS} rounds of three reads, then the same"
        " quiet and the same sum. Install: `POST /plugins/functions` of multi (a real Go plugin,"
        f" the same zip), median of {sizes.engine_install_reps} taken in turns, each deleted before the next; the"
        " service's install is durable (fsynced before its 201), the engine's is not.",
        "",
        "## Time per section",
        "",
        *[f"- {title}: {took:.0f} s" for title, took in bench.timings.items()],
        "",
    ]
    if bench.notes:
        lines += ["## Notes", "", *[f"- {note}" for note in bench.notes], ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: only check that the bench runs")
    parser.add_argument("--out", type=Path, default=harness.BENCH / "RESULTS.md", help="report to write")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, homes)")
    parser.add_argument("--only", choices=["reads", "large", "small", "cold", "manyfiles", "engine"],
                        action="append",
                        help="run only these sections")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    harness.ensure_wrk()
    if shutil.which("unzip") is None:
        sys.exit("bench: unzip is missing: apt-get install unzip")

    started = datetime.datetime.now(datetime.UTC)
    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="kuiper-bench-"))
    bench = Bench(sizes, work)
    sections = args.only or ["reads", "large", "small", "cold", "manyfiles", "engine"]
    try:
        if "reads" in sections:
            bench.reads()
        if "large" in sections:
            bench.large_install()
        if "small" in sections:
            bench.small_installs()
        if "cold" in sections:
            bench.cold_start()
        if "manyfiles" in sections:
            bench.many_files_install()
        if "engine" in sections:
            bench.against_engine()
    finally:
        bench.stop_all()
        marks = list(bench.timings.items()) + [("end", time.perf_counter())]
        bench.timings = {title: marks[i + 1][1] - mark for i, (title, mark) in enumerate(marks[:-1])}
        broken = [s.name for s in bench.servers if s.tracebacks()]
        if broken:
            bench.notes.append(f"tracebacks in the logs of: {', '.join(broken)}")
            for server in bench.servers:
                if server.tracebacks():
                    print(f"\n-- {server.name} log tail:\n{server.log_tail()}", file=sys.stderr)
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    seconds = time.perf_counter() - began
    bench.load_averages.append(os.getloadavg())
    command = "make bench" if not args.smoke else "python bench/run.py --smoke"
    if args.only:
        command = "python bench/run.py" + "".join(f" --only {section}" for section in args.only)
    print("\n" + bench.console_table())
    if bench.cpu_per_request:
        print("\nCPU per request (gunicorn master + workers):\n" + "\n".join(bench.cpu_table()))
    if bench.engine_cpu:
        print("\nCPU per request against kuiperd:\n" + "\n".join(bench.engine_cpu_table()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_report(bench, args.out, command, "smoke" if args.smoke else "full", started, seconds)
    print(f"\nwrote {args.out} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
