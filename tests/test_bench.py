"""The benchmark runner end to end, on its quick sweep (the numbers themselves are not judged)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "op,passes",
    [
        ("layer_norm", {"fwd", "bwd", "fwd+bwd"}),
        ("attention", {"fwd", "fwd+bwd"}),
        ("conv2d_relu", {"fwd", "fwd+bwd"}),
        ("bigram_counts", {"count"}),
    ],
)
def test_bench_quick_writes_a_report(tmp_path, op, passes):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "dlfast", "bench", "--op", op, "--quick", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["meta"]["copy_gbps"] > 0
    rows = report["rows"]
    backends = {r["backend"] for r in rows}
    assert "torch" in backends
    assert {r["pass"] for r in rows} == passes
    for row in rows:
        assert row["median_ms"] > 0 and (row["gbps"] or row["tflops"]) > 0, row
        assert row["frac_of_limit"] > 0, row
        if op == "bigram_counts":
            tokens_per_s = row["shape"]["tokens"] / (row["median_ms"] / 1e3)
            assert row["tokens_per_s"] == pytest.approx(tokens_per_s), row
        else:
            assert row["tokens_per_s"] is None, row
    assert ("tokens/s" in done.stdout) == (op == "bigram_counts")
    if op in ("attention", "conv2d_relu"):
        assert report["meta"]["matmul_tflops"]
        assert row["vs_torch"] > 0, row
