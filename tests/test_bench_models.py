"""`python -m dlfast bench --model ...` end to end on its quick sizes (the numbers are not judged).

Inductor's C++ compilation dominates a CPU run, so the compile path is exercised once, on the
GPT (the model whose compiled speed the benchmark is for); the ResNet's compiled copies are
skipped through DLFAST_BENCH_COMPILE=0, which the rows then say.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dlfast.bench import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("model,unit,compiled", [("gpt", "tokens/s", True), ("resnet", "images/s", False)])
def test_bench_model_quick_writes_a_report(tmp_path, model, unit, compiled):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "dlfast", "bench", "--model", model, "--quick", "--json", str(out)]
    env = dict(os.environ, DLFAST_BENCH_COMPILE="1" if compiled else "0")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["schema"] == "dlfast-bench-models/1"
    assert report["meta"]["complete"] and report["meta"]["torch"]
    rows = report["rows"]
    workload = models.WORKLOADS[model](torch.device("cpu"), True)
    parameters = sum(p.numel() for p in workload.build().parameters())
    assert [(r["impl"], r["mode"]) for r in rows] == [
        ("dlfast", "eager"),
        ("dlfast", "compile"),
        ("twin", "eager"),
        ("twin", "compile"),
    ]
    for row in rows:
        assert row["model"] == model and row["unit"] == unit, row
        if row["mode"] == "compile" and not compiled:
            assert row["error"].startswith("skipped") and row["throughput"] is None, row
            assert row["peak_mem_mb"] is None, row
            continue
        assert row["error"] is None, row
        assert math.isfinite(row["throughput"]) and row["throughput"] > 0, row
        # Measured on the CPU too, and at least what the copy holds: parameters, their gradients
        # and AdamW's two moments, all fp32.
        assert row["peak_mem_mb"] * 2**20 >= 4 * 4 * parameters, row
        assert row["median_step_ms"] > 0 and row["vs_twin_eager"] > 0, row
        assert (row["compile_s"] is not None) == (row["mode"] == "compile"), row
        if compiled:
            assert row["vs_twin_compiled"] > 0, row
    twin_eager = rows[2]
    assert twin_eager["vs_twin_eager"] == 1.0
    assert f"{model}" in done.stdout and "vs twin eager" in done.stdout


def test_cpu_peak_bytes_is_the_most_a_call_holds_at_once():
    mib = 2**20

    def step():
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)  # 3 MiB held
        del a
        c = torch.empty(mib, dtype=torch.uint8)  # 3 MiB again, not 4: a's MiB was freed
        return b, c

    held_before = torch.empty(8 * mib, dtype=torch.uint8)  # allocated outside: not counted
    assert models.cpu_peak_bytes(step) == 3 * mib
    # Per call, not the process's high-water mark: a smaller call after it reads smaller.
    assert models.cpu_peak_bytes(lambda: torch.empty(mib // 2, dtype=torch.uint8)) == mib // 2
    del held_before
