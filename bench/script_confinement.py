"""What confining install.sh costs: a trivial script run by run_install_script against a bare `/bin/sh`.

Usage: `.venv/bin/python bench/script_confinement.py [runs]` (default 40). The two are interleaved, run by
run, so a busy machine slows both alike. Prints the medians and their difference; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kuiper_plugins.install.scripts import confinement, run_install_script

WARMUP = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=int, nargs="?", default=40)
    runs = parser.parse_args().runs
    confined = confinement()
    if not confined.available:
        print(f"install.sh cannot be confined here: {confined.description}")
        return 1
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        script = work / "install.sh"
        script.write_text("exit 0\n")
        for index in range(runs + WARMUP):
            started = time.perf_counter()
            subprocess.run(["/bin/sh", str(script)], cwd=work, stdin=subprocess.DEVNULL, check=True)
            middle = time.perf_counter()
            run_install_script(script, [], cwd=work, timeout=30, marker=uuid.uuid4().hex, confined=confined)
            ended = time.perf_counter()
            if index >= WARMUP:
                bare.append((middle - started) * 1000)
                ours.append((ended - middle) * 1000)
    bare_median, our_median = statistics.median(bare), statistics.median(ours)
    print(f"install.sh runs: {runs}, confined by {confined.description}")
    print(f"bare /bin/sh:        median {bare_median:6.1f} ms  (min {min(bare):.1f}, max {max(bare):.1f})")
    print(f"run_install_script:  median {our_median:6.1f} ms  (min {min(ours):.1f}, max {max(ours):.1f})")
    print(f"cost per install.sh: {our_median - bare_median:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
