"""Profile one gunicorn worker of the service under wrk load with py-spy; print where its time goes.

    .venv/bin/pip install py-spy        # optional: `make bench` does not need it
    .venv/bin/python bench/profile_worker.py --size 10000 --endpoint list

Starts the production gunicorn command on a populated temporary home (as bench/run.py does),
loads one read endpoint with wrk, samples the first worker for a few seconds, and prints the
frames holding the most samples, inclusive and self.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import harness
from fixtures import populate

ENDPOINTS = ("list", "describe", "udfs", "udfs-one")


def frame_label(frame: str) -> str:
    """`function (path/to/file.py:12)` -> `function file.py:12`."""
    function, _, where = frame.partition(" (")
    return f"{function} {where.rstrip(')').rsplit('/', 1)[-1]}" if where else function


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--endpoint", choices=ENDPOINTS, default="describe")
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    harness.ensure_wrk()

    work = Path(tempfile.mkdtemp(prefix="kuiper-profile-"))
    try:
        population = populate(work / "home", args.size)
        paths = {
            "list": "/plugins/sources",
            "describe": f"/plugins/sources/{population.probe_source}",
            "udfs": "/plugins/udfs",
            "udfs-one": f"/plugins/udfs/{population.probe_function}",
        }
        url = f"{{}}{paths[args.endpoint]}"
        server = harness.Server("profiled", "wsgi:app", population.home, work / "gunicorn.log").start()
        try:
            worker = server.wait_workers_settled()[0]
            harness.wrk(url.format(server.url), 1)
            runs: list[harness.WrkRun] = []
            load = threading.Thread(target=lambda: runs.append(harness.wrk(url.format(server.url), args.seconds + 2)))
            load.start()
            raw = work / "samples.txt"
            command = [py_spy, "record", "-p", str(worker), "-d", str(args.seconds), "-r", "400", "-f", "raw",
                       "-o", str(raw), "--nonblocking"]
            subprocess.run(command, check=True, capture_output=True, timeout=args.seconds + 60)
            load.join(timeout=args.seconds + 60)
        finally:
            server.stop()

        inclusive: collections.Counter[str] = collections.Counter()
        own: collections.Counter[str] = collections.Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            samples = int(count)
            total += samples
            frames = [frame_label(f) for f in stack.split(";")]
            for label in set(frames):
                inclusive[label] += samples
            own[frames[-1]] += samples
        if runs:
            print(f"{args.endpoint} with {args.size} plugins: {runs[0].requests_per_second:.0f} req/s under wrk")
        print(f"{total} samples of worker {worker}\n\ninclusive:")
        for label, samples in inclusive.most_common(args.top):
            print(f"  {samples / total * 100:5.1f}%  {label}")
        print("\nself:")
        for label, samples in own.most_common(args.top // 2):
            print(f"  {samples / total * 100:5.1f}%  {label}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
