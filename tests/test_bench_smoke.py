"""`make bench` still runs: bench/run.py --smoke, tiny sizes, real gunicorn and wrk; no assertion on time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_bench_smoke_runs_every_section_and_writes_its_report(tmp_path):
    report = tmp_path / "RESULTS.md"
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the bench's work folder lands in pytest's tmp_path
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--out", str(report)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    text = report.read_text(encoding="utf-8")
    assert text.startswith("# kuiper-plugins benchmark results")
    for section in ("reads, 20 plugins", "reads, 200 plugins", "one large install", "small installs", "cold start",
                    "-file portable install", "against kuiperd, 3 plugins"):
        assert section in text, section
    # Beside the service's idle memory, the design's floor, measured in the same run (a bare gunicorn and Flask).
    floor = re.search(r"\| idle PSS of the design's floor[^|]*\| ([0-9.]+) MB \| ([0-9.]+) MB \(kuiperd's own\)", text)
    assert floor is not None and 0 < float(floor[1]) and 0 < float(floor[2]), text
    assert "tracebacks in the logs" not in text, text
