"""The benchmark runner end to end, on its quick sweep (the numbers themselves are not judged)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_writes_a_report(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "dlfast", "bench", "--op", "layer_norm", "--quick", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["meta"]["copy_gbps"] > 0
    rows = report["rows"]
    backends = {r["backend"] for r in rows}
    assert "torch" in backends
    assert {r["pass"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    for row in rows:
        assert row["median_ms"] > 0 and row["gbps"] > 0, row
        assert row["vs_torch"] > 0, row
