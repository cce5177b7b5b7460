"""The benchmark report, and the files generated from the committed results: the README's
performance block, the per-device report.md and the DEFAULTS table of dlfast/backends.py must be
what `python -m dlfast.bench.report --readme --committed --defaults` gives today."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dlfast import backends
from dlfast.bench import defaults, report

RESULTS = defaults.RESULTS


def test_readme_performance_block_is_generated_from_the_committed_results():
    text = report.README.read_text()
    start, end = text.index(report.PERF_BEGIN), text.index(report.PERF_END) + len(report.PERF_END) + 1
    assert text[start:end] == report.readme_block(), (
        "README.md's performance block is stale: run python -m dlfast.bench.report --readme"
    )


def test_defaults_table_is_generated_from_the_committed_results():
    block = defaults.current_block(Path(backends.__file__).read_text())
    assert block == defaults.render(), (
        "DEFAULTS in dlfast/backends.py is stale: run python -m dlfast.bench.report --defaults"
    )


@pytest.mark.parametrize("directory", report.device_dirs(), ids=lambda p: p.name)
def test_committed_device_report_is_up_to_date(directory):
    assert (directory / "report.md").read_text() == report.committed_markdown(directory), (
        f"{directory}/report.md is stale: run python -m dlfast.bench.report --committed"
    )
    for line in (directory / "report.md").read_text().splitlines():
        if line.startswith("!["):
            assert (directory / line[line.index("](") + 2 : -1]).is_file(), line


# ---------------------------------------------------------------------------------------------
# The report of a run


def _op_row(op, pass_, dtype, shape, backend, kind, ms, torch_ms, gbps=None, tflops=None, frac=None):
    return {
        "op": op,
        "pass": pass_,
        "dtype": dtype,
        "shape": shape,
        "backend": backend,
        "kind": kind,
        "median_ms": ms,
        "gbps": gbps,
        "tflops": tflops,
        "frac_of_limit": frac,
        "vs_torch": None if ms is None else torch_ms / ms,
        "vs_best_peer": None if ms is None else torch_ms / ms,
    }


def _meta(device_type="cpu", **extra):
    return {
        "device": "Test CPU" if device_type == "cpu" else "Test GPU",
        "device_type": device_type,
        "cpu_threads": 2,
        "torch": "2.13.0",
        "triton": None,
        "cuda": None,
        "git_commit": "0123456789abcdef",
        "git_dirty": False,
        "quick": False,
        "date": "2026-01-01T00:00:00+00:00",
        "copy_gbps": 40.0,
        "matmul_tflops": {},
        **extra,
    }


def _op_doc(rows, device_type="cpu", **meta):
    return {"schema": defaults.OP_SCHEMA, "meta": _meta(device_type, **meta), "notes": [], "rows": rows}


MODEL_DOC = {
    "schema": report.MODEL_SCHEMA,
    "meta": _meta(),
    "notes": ["resnet: compiled copies skipped"],
    "rows": [
        {
            "model": "gpt",
            "config": {"n_layer": 2, "n_embd": 64, "batch_size": 8},
            "dtype": "float32",
            "impl": impl,
            "mode": mode,
            "median_step_ms": ms,
            "throughput": None if ms is None else 512 / ms * 1e3,
            "unit": "tokens/s",
            "peak_mem_mb": None,
            "compile_s": 12.5 if mode == "compile" and ms is not None else None,
            "vs_twin_eager": None if ms is None else 10.0 / ms,
            "vs_twin_compiled": None,
            "error": "skipped: DLFAST_BENCH_COMPILE=0" if ms is None else None,
        }
        for impl, mode, ms in (("dlfast", "eager", 8.0), ("dlfast", "compile", None), ("twin", "eager", 10.0))
    ],
}


def test_report_of_op_and_model_results(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        _op_row("layer_norm", "fwd", "float32", {"M": 64, "N": n}, b, k, ms, 2.0, gbps=g, frac=g and g / 40)
        for n in (512, 1024)
        for b, k, ms, g in (
            ("cpu", "dlfast", 1.0, 20.0),
            ("torch", "peer", 2.0, 10.0),
            ("liger", "peer", None, None),
        )
    ]
    (tmp_path / "layer_norm.json").write_text(json.dumps(_op_doc(rows)))
    (tmp_path / "model-gpt.json").write_text(json.dumps(MODEL_DOC))
    (tmp_path / "unrelated.json").write_text(json.dumps({"benchmarks": []}))  # not a dlfast result: skipped
    out = tmp_path / "report"
    assert report.main([str(tmp_path), "--out", str(out)]) == 0

    doc = json.loads((out / "report.json").read_text())
    assert doc["schema"] == report.REPORT_SCHEMA
    assert [s["file"] for s in doc["sources"]] == ["layer_norm.json", "model-gpt.json"]
    assert len(doc["op_rows"]) == 6 and len(doc["model_rows"]) == 3
    assert {k: doc["op_rows"][0][k] for k in ("source", "device", "torch", "git_commit")} == {
        "source": "layer_norm.json",
        "device": "Test CPU",
        "torch": "2.13.0",
        "git_commit": "0123456789abcdef",
    }
    (summary,) = doc["summary"]
    assert summary["backend"] == "cpu" and summary["vs_torch"] == [2.0, 2.0]
    assert doc["plots"] == ["layer_norm-fwd.png"] and (out / "layer_norm-fwd.png").stat().st_size > 0

    md = (out / "report.md").read_text()
    assert "| float32 | 64x512 | **1.00 (2.00x)** | 2.00 | - | 2.00x | 50% |" in md
    assert "![layer_norm layer_norm-fwd.png](layer_norm-fwd.png)" in md
    assert "| gpt | n_layer=2, n_embd=64, batch_size=8 | float32 | dlfast | compile | - |" in md
    assert "skipped: DLFAST_BENCH_COMPILE=0" in md


def test_report_gives_tokens_per_s_of_counting_rows_also_where_the_run_did_not_record_it(tmp_path):
    shape = {"tokens": 10**6, "V": 27}
    rows = [
        _op_row("bigram_counts", "count", "int32", shape, "cpu", "dlfast", 0.5, 2.0, gbps=8.0, frac=0.2),
        _op_row("bigram_counts", "count", "int32", shape, "torch", "peer", 2.0, 2.0, gbps=2.0, frac=0.05),
    ]
    recorded = [{**row, "tokens_per_s": 10**6 / (row["median_ms"] / 1e3)} for row in rows]
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    (tmp_path / "old" / "bigram_counts.json").write_text(json.dumps(_op_doc(rows)))
    (tmp_path / "new" / "bigram_counts.json").write_text(json.dumps(_op_doc(recorded)))
    for run in ("old", "new"):
        built = report.write_report(
            report.load_results(report.expand([tmp_path / run])), tmp_path / run, "t", with_plots=False
        )
        assert [r["tokens_per_s"] for r in built["op_rows"]] == [2e9, 5e8]
        md = (tmp_path / run / "report.md").read_text()
        assert "| dlfast vs best peer | dlfast of limit | dlfast tokens/s |" in md
        assert "| int32 | 1000000x27 | **0.5 (4.00x)** | 2.00 | 4.00x | 20% | 2e+09 |" in md


def test_report_has_no_tokens_per_s_column_for_other_ops(tmp_path):
    row = _op_row("layer_norm", "fwd", "float32", {"M": 64, "N": 512}, "torch", "peer", 1.0, 1.0, gbps=9.0)
    (tmp_path / "layer_norm.json").write_text(json.dumps(_op_doc([row])))
    built = report.write_report(
        report.load_results([tmp_path / "layer_norm.json"]), tmp_path, "t", False, False
    )
    assert built["op_rows"][0]["tokens_per_s"] is None
    assert "tokens/s" not in (tmp_path / "report.md").read_text()


def test_report_of_files_with_the_same_name_from_two_devices(tmp_path):
    row = _op_row("bigram_counts", "count", "int32", {"tokens": 10**6, "V": 27}, "torch", "peer", 1.0, 1.0)
    for device in ("a", "b"):
        (tmp_path / device).mkdir()
        (tmp_path / device / "bigram_counts.json").write_text(json.dumps(_op_doc([row])))
    built = report.build(report.load_results(report.expand([tmp_path / "a", tmp_path / "b"])))
    assert [s["file"] for s in built["sources"]] == ["a/bigram_counts.json", "b/bigram_counts.json"]


# ---------------------------------------------------------------------------------------------
# The defaults derivation, on made-up results


def _derive(docs: list[dict]) -> dict:
    """The DEFAULTS table that render() gives for these results, executed."""
    block = defaults.render([(f"benchmarks/results/x/{i}.json", doc) for i, doc in enumerate(docs)])
    namespace = {"torch": torch, "DefaultRow": backends.DefaultRow}
    exec(block, namespace)
    return namespace["DEFAULTS"]


def _pick(table, op, device, numel, dtype):
    for max_numel, dtypes, names in table[op, device]:
        if (max_numel is None or numel <= max_numel) and (dtypes is None or dtype in dtypes):
            return names[0]
    raise AssertionError("no catch-all row")


def _ln_rows(M_N_cpu_torch: list[tuple[int, int, float, float]], dtype="bfloat16", dlfast="cuda"):
    rows = []
    for M, N, ours, theirs in M_N_cpu_torch:
        shape = {"M": M, "N": N}
        rows.append(_op_row("layer_norm", "fwd+bwd", dtype, shape, dlfast, "dlfast", ours, theirs))
        rows.append(_op_row("layer_norm", "fwd+bwd", dtype, shape, "torch", "peer", theirs, theirs))
        # the forward alone says the opposite: it must not decide
        rows.append(_op_row("layer_norm", "fwd", dtype, shape, dlfast, "dlfast", theirs * 2, theirs))
        rows.append(_op_row("layer_norm", "fwd", dtype, shape, "torch", "peer", theirs, theirs))
    return rows


def test_derived_cuda_defaults_stay_inside_the_measured_sizes():
    rows = _ln_rows([(1024, 1024, 1.0, 2.0), (4096, 1024, 1.0, 2.0)])
    table = _derive([_op_doc(rows, "cuda")])
    assert _pick(table, "layer_norm", "cuda", 2**20, torch.bfloat16) == "cuda"
    assert _pick(table, "layer_norm", "cuda", 2**21, torch.float16) == "cuda"  # fp16 stands with bf16
    assert _pick(table, "layer_norm", "cuda", 2**22, torch.bfloat16) == "cuda"
    assert _pick(table, "layer_norm", "cuda", 2**20 - 1, torch.bfloat16) == "torch"  # not measured
    assert _pick(table, "layer_norm", "cuda", 2**22 + 1, torch.bfloat16) == "torch"
    assert _pick(table, "layer_norm", "cuda", 2**21, torch.float32) == "torch"  # dtype not measured
    assert table["layer_norm", "cuda"][-1] == (None, None, ("torch",))


def test_derived_defaults_need_a_clear_win_at_both_ends_of_a_gap():
    # 2^20: 1.5x; 2^22: within MIN_GAIN of torch; 2^24: 1.5x again.
    rows = _ln_rows([(1024, 1024, 1.0, 1.5), (4096, 1024, 1.0, 1.02), (16384, 1024, 1.0, 1.5)])
    table = _derive([_op_doc(rows, "cuda")])
    picks = [
        _pick(table, "layer_norm", "cuda", n, torch.bfloat16) for n in (2**20, 2**21, 2**22, 2**23, 2**24)
    ]
    assert picks == ["cuda", "torch", "torch", "torch", "cuda"]


def test_derived_defaults_never_choose_an_unmeasured_backend_or_a_losing_one():
    rows = _ln_rows([(1024, 1024, 3.0, 2.0)], dlfast="triton")
    table = _derive([_op_doc(rows, "cuda")])
    assert table["layer_norm", "cuda"] == ((None, None, ("torch",)),)


def test_derived_cpu_defaults_extend_upwards_and_down_to_the_call_overhead():
    # 2^22 elements: the kernel saves 1 ms of 2; below, its 30 us per call eats the lead.
    rows = _ln_rows([(4096, 1024, 1.0, 2.0)], dlfast="cpu")
    table = _derive([_op_doc(rows, "cpu")])
    assert _pick(table, "layer_norm", "cpu", 2**30, torch.bfloat16) == "cpu"
    assert _pick(table, "layer_norm", "cpu", 2**22, torch.bfloat16) == "cpu"
    floor = table["layer_norm", "cpu"][0][0]
    assert 2**10 < floor < 2**22 and table["layer_norm", "cpu"][0][2] == ("torch",)
    assert _pick(table, "layer_norm", "cpu", floor, torch.bfloat16) == "torch"
    assert _pick(table, "layer_norm", "cpu", floor + 1, torch.bfloat16) == "cpu"


def test_derivation_skips_runs_with_fewer_threads(tmp_path):
    (tmp_path / "cpu-box").mkdir()
    two = _op_doc(_ln_rows([(4096, 1024, 1.0, 2.0)], dlfast="cpu"), "cpu", cpu_threads=2)
    one = _op_doc(_ln_rows([(4096, 1024, 3.0, 2.0)], dlfast="cpu"), "cpu", cpu_threads=1)
    (tmp_path / "cpu-box" / "layer_norm.json").write_text(json.dumps(two))
    (tmp_path / "cpu-box" / "layer_norm-1thread.json").write_text(json.dumps(one))
    chosen = defaults.committed_op_results(tmp_path)
    assert [Path(path).name for path, _ in chosen] == ["layer_norm.json"]


# ---------------------------------------------------------------------------------------------
# The CPU regression check


def _pytest_benchmark(ratios: dict[str, float]) -> dict:
    benchmarks = []
    for case, ratio in ratios.items():
        for impl, seconds in (("dlfast", ratio * 1e-3), ("torch", 1e-3)):
            stats = {"min": seconds, "median": seconds * 1.1, "mean": seconds * 1.2}
            benchmarks.append({"group": case, "params": {"case": case, "impl": impl}, "stats": stats})
    return {"benchmarks": benchmarks, "datetime": "2026-01-01T00:00:00", "commit_info": {"id": "abc"}}


def test_regression_check_fails_only_past_the_factor(tmp_path):
    base = _pytest_benchmark({"a": 0.5, "b": 0.5, "c": 1.0})
    (tmp_path / "base.json").write_text(json.dumps(base))
    ok = _pytest_benchmark({"a": 0.7, "b": 0.4, "c": 1.0, "new": 2.0})
    (tmp_path / "ok.json").write_text(json.dumps(ok))
    args = ["--baseline", str(tmp_path / "base.json"), "--out", str(tmp_path / "out")]
    assert report.main(["--regression", str(tmp_path / "ok.json"), *args]) == 0
    rows = json.loads((tmp_path / "out" / "comparison.json").read_text())["cases"]
    assert {r["case"]: r["status"] for r in rows} == {"a": "ok", "b": "ok", "c": "ok", "new": "new"}

    worse = _pytest_benchmark({"a": 0.8, "b": 0.5})  # a: 1.6x worse; c: missing
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    assert report.main(["--regression", str(tmp_path / "worse.json"), *args]) == 1
    text = (tmp_path / "out" / "comparison.md").read_text()
    assert "| a | 0.500 | 0.800 | 1.60x | worse |" in text and "FAILED: a, c" in text
