"""`python -m dlfast.bench.report`: one report from benchmark JSON files, and the files generated
from the committed results.

    python -m dlfast.bench.report PATH... [--out DIR]
        report.json, report.md and PNG plots of the op results (schema dlfast-bench/1) and model
        results (dlfast-bench-models/1) in PATH (files, or directories of *.json)
    python -m dlfast.bench.report --committed
        report.md and the plots in every benchmarks/results/<device>/
    python -m dlfast.bench.report --readme
        the performance block of README.md
    python -m dlfast.bench.report --defaults
        the DEFAULTS block of dlfast/backends.py (the derivation is in dlfast/bench/defaults.py)
    python -m dlfast.bench.report --regression RUN --baseline BASE [--factor F] [--out DIR]
        the CPU regression check of benchmarks/test_cpu_kernels.py

With --check, --committed, --readme and --defaults write nothing and exit 1 where a file is not
what the committed results give (tests/test_bench_report.py checks the same).

Ratios are those of the rows: vs_torch is PyTorch's eager op's time over the row's, vs_best_peer
the fastest peer's (> 1: the row is faster); frac_of_limit the achieved throughput over a device
copy's GB/s or a same-dtype matmul's TFLOP/s measured in the same run; tokens/s the tokens an op
over a token stream read (bigram counting) over the median time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

from dlfast.bench import defaults, runner
from dlfast.bench.defaults import OP_SCHEMA, RESULTS, ROOT, deciding_pass, geomean, load_results

MODEL_SCHEMA = "dlfast-bench-models/1"
REPORT_SCHEMA = "dlfast-bench-report/1"
README = ROOT / "README.md"
PERF_BEGIN = "<!-- perf:begin -->"
PERF_END = "<!-- perf:end -->"

# The meta fields every row of report.json carries, so that a row read alone says where it ran.
ROW_META = ("device", "torch", "triton", "cuda", "git_commit")

# Plots: the shape dim on the x axis (log scale), and the dims that split a sweep into panels
# (with the dtype). Ops not named here plot their cases in order on a categorical axis.
X_DIM = {"layer_norm": "N", "attention": "L", "bigram_counts": "tokens"}
PANEL_DIMS = {"attention": ("D", "causal"), "bigram_counts": ("V",), "conv2d_relu": ("channels_last",)}


# ---------------------------------------------------------------------------------------------
# Reading


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; directories as their *.json files, sorted."""
    out = []
    for p in map(Path, paths):
        out += sorted(p.glob("*.json")) if p.is_dir() else [p]
    return out


def _labels(paths: list[Path]) -> list[str]:
    """Each file's name, or parent/name where names repeat (one report over several devices)."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.parent.name}/{p.name}" for p in paths]


def _source(label: str, doc: dict) -> dict:
    meta = doc.get("meta", {})
    keys = (
        "date",
        "device",
        "device_type",
        "cpu_threads",
        "torch",
        "triton",
        "cuda",
        "git_commit",
        "git_dirty",
        "quick",
        "copy_gbps",
        "matmul_tflops",
    )
    return {
        "file": label,
        "schema": doc["schema"],
        **{k: meta.get(k) for k in keys},
        "notes": doc.get("notes", []),
    }


def _with_tokens_per_s(row: dict) -> dict:
    """The row, with tokens_per_s from its shape and median time where it was written before the
    runner recorded that figure (the committed results of older runs)."""
    if "tokens_per_s" in row:
        return row
    return {**row, "tokens_per_s": runner.tokens_per_s(runner.row_work(row), row["median_ms"])}


def build(documents: list[tuple[Path, dict]]) -> dict:
    """The report.json document of these results: sources, every row with its source's meta, the summary."""
    sources, op_rows, model_rows = [], [], []
    documents = [(path, doc) for path, doc in documents if doc["schema"] in (OP_SCHEMA, MODEL_SCHEMA)]
    for label, (_, doc) in zip(_labels([p for p, _ in documents]), documents, strict=True):
        source = _source(label, doc)
        sources.append(source)
        extra = {"source": source["file"], **{k: source[k] for k in ROW_META}}
        if doc["schema"] == OP_SCHEMA:
            op_rows += [{**_with_tokens_per_s(row), **extra} for row in doc["rows"]]
        else:
            model_rows += [{**row, **extra} for row in doc["rows"]]
    return {
        "schema": REPORT_SCHEMA,
        "sources": sources,
        "summary": summarise(op_rows),
        "op_rows": op_rows,
        "model_rows": model_rows,
    }


# ---------------------------------------------------------------------------------------------
# Summary


def _span(values: list[float]) -> list[float] | None:
    return [min(values), max(values)] if values else None


def summarise(rows: list[dict], only_deciding: bool = False) -> list[dict]:
    """Per (source, op, pass, dtype): the dlfast backend with the highest geometric-mean vs_torch,
    and its ranges over the shapes."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["source"], row["op"], row["pass"], row["dtype"]), []).append(row)
    passes: dict[tuple[str, str], set[str]] = {}
    for source, op, pass_, _ in groups:
        passes.setdefault((source, op), set()).add(pass_)
    out = []
    for (source, op, pass_, dtype), group in groups.items():
        if only_deciding and pass_ != deciding_pass(passes[source, op]):
            continue
        by_backend: dict[str, list[dict]] = {}
        for row in group:
            if row["kind"] == "dlfast" and row["vs_torch"] is not None:
                by_backend.setdefault(row["backend"], []).append(row)
        if not by_backend:
            continue
        best = max(by_backend, key=lambda b: geomean([r["vs_torch"] for r in by_backend[b]]))
        chosen = by_backend[best]
        out.append(
            {
                "source": source,
                "op": op,
                "pass": pass_,
                "dtype": dtype,
                "backend": best,
                "cases": len(chosen),
                "vs_torch": _span([r["vs_torch"] for r in chosen]),
                "vs_torch_geomean": geomean([r["vs_torch"] for r in chosen]),
                "vs_best_peer": _span([r["vs_best_peer"] for r in chosen if r["vs_best_peer"] is not None]),
                "frac_of_limit": _span(
                    [r["frac_of_limit"] for r in chosen if r["frac_of_limit"] is not None]
                ),
            }
        )
    return out


def _x(span: list[float] | None) -> str:
    if span is None:
        return "-"
    lo, hi = span
    return f"{lo:.2f}x" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}x"


def _pct(span: list[float] | None) -> str:
    if span is None:
        return "-"
    lo, hi = (round(100 * v) for v in span)
    return f"{lo}%" if lo == hi else f"{lo}-{hi}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def summary_table(summary: list[dict], with_pass: bool = True) -> list[str]:
    header = ["op", "file", *(["pass"] if with_pass else []), "dtype", "best dlfast", "vs torch"]
    header += ["vs best peer", "of limit", "cases"]
    rows = [
        [
            s["op"],
            s["source"],
            *([s["pass"]] if with_pass else []),
            s["dtype"],
            s["backend"],
            _x(s["vs_torch"]),
            _x(s["vs_best_peer"]),
            _pct(s["frac_of_limit"]),
            str(s["cases"]),
        ]
        for s in summary
    ]
    return _table(header, rows)


# ---------------------------------------------------------------------------------------------
# Markdown


def _meta_line(source: dict) -> str:
    parts = [f"{source['device']} ({source['device_type']})"]
    if source["device_type"] == "cpu" and source["cpu_threads"]:
        parts.append(f"{source['cpu_threads']} thread{'s' if source['cpu_threads'] > 1 else ''}")
    parts.append(f"torch {source['torch']}")
    if source["triton"]:
        parts.append(f"Triton {source['triton']}")
    if source["cuda"]:
        parts.append(f"CUDA {source['cuda']}")
    if source["git_commit"]:
        dirty = " with uncommitted changes" if source["git_dirty"] else ""
        parts.append(f"commit {source['git_commit'][:10]}{dirty}")
    if source["date"]:
        parts.append(source["date"][:10])
    limits = []
    if source["copy_gbps"]:
        limits.append(f"copy {source['copy_gbps']:.1f} GB/s")
    for dtype, tflops in sorted((source["matmul_tflops"] or {}).items()):
        limits.append(f"{dtype} matmul {tflops:.3g} TFLOP/s")
    text = ", ".join(parts)
    return text + (f"; limits: {', '.join(limits)}" if limits else "")


def _shape_label(shape: dict) -> str:
    return "x".join(str(v) for v in shape.values())


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    for floor, spec in ((100, ".0f"), (10, ".1f"), (1, ".2f")):
        if value >= floor:
            return format(value, spec)
    return f"{value:.3g}"


def _throughput(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.4g} {unit}".strip()


def _op_section(source: dict, op: str, rows: list[dict], plots: list[str]) -> list[str]:
    dims = " x ".join(rows[0]["shape"])
    lines = [f"## {op}: `{source['file']}`", "", _meta_line(source) + ".", ""]
    lines += [f"![{op} {p}]({p})" for p in plots]
    if plots:
        lines.append("")
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    with_tokens = any(r["tokens_per_s"] is not None for r in rows)
    for pass_ in dict.fromkeys(r["pass"] for r in rows):
        cases: dict[tuple[str, str], dict[str, dict]] = {}
        for r in rows:
            if r["pass"] == pass_:
                cases.setdefault((r["dtype"], _shape_label(r["shape"])), {})[r["backend"]] = r
        header = ["dtype", dims, *backends, "dlfast vs best peer", "dlfast of limit"]
        header += ["dlfast tokens/s"] if with_tokens else []
        table = []
        for (dtype, label), by in cases.items():
            timed = [r for r in by.values() if r["median_ms"] is not None]
            fastest = min(timed, key=lambda r: r["median_ms"])["backend"] if timed else None
            cells = []
            for b in backends:
                r = by.get(b)
                if r is None:
                    cells.append("")
                    continue
                cell = _ms(r["median_ms"])
                if b != "torch" and r["vs_torch"] is not None:
                    cell += f" ({r['vs_torch']:.2f}x)"
                cells.append(f"**{cell}**" if b == fastest else cell)
            ours = [r for r in by.values() if r["kind"] == "dlfast" and r["median_ms"] is not None]
            best = min(ours, key=lambda r: r["median_ms"]) if ours else None
            peer = "-" if best is None or best["vs_best_peer"] is None else f"{best['vs_best_peer']:.2f}x"
            limit = (
                "-"
                if best is None or best["frac_of_limit"] is None
                else f"{100 * best['frac_of_limit']:.0f}%"
            )
            table.append([dtype, label, *cells, peer, limit])
            if with_tokens:
                table[-1].append(_throughput(None if best is None else best["tokens_per_s"]))
        lines += [f"{pass_}: median ms (vs torch); bold: the fastest.", ""]
        lines += _table(header, table) + [""]
    return lines


def _config_text(config: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (config or {}).items())


def _model_section(source: dict, rows: list[dict]) -> list[str]:
    lines = [f"## models: `{source['file']}`", "", _meta_line(source) + ".", ""]
    header = ["model", "config", "dtype", "impl", "mode", "step ms", "throughput", "peak MB"]
    header += ["compile s", "vs twin eager", "vs twin compiled", "error"]
    table = []
    for r in rows:

        def num(key: str, spec: str, r: dict = r) -> str:
            return "-" if r.get(key) is None else format(r[key], spec)

        throughput = _throughput(r.get("throughput"), r.get("unit") or "")
        table.append(
            [
                str(r.get("model")),
                _config_text(r.get("config")),
                str(r.get("dtype")),
                str(r.get("impl")),
                str(r.get("mode")),
                _ms(r.get("median_step_ms")),
                throughput,
                num("peak_mem_mb", ".0f"),
                num("compile_s", ".1f"),
                num("vs_twin_eager", ".2f"),
                num("vs_twin_compiled", ".2f"),
                str(r.get("error") or ""),
            ]
        )
    return lines + _table(header, table) + [""]


def markdown(report: dict, plots: dict[tuple[str, str], list[str]], title: str) -> str:
    """report.md: the summary, then per source and op a table per pass; then the model results."""
    lines = [
        f"# {title}",
        "",
        "Generated by `python -m dlfast.bench.report` from "
        + ", ".join(f"`{s['file']}`" for s in report["sources"])
        + "; do not edit. vs torch: PyTorch's eager op's time over the row's; vs best peer: the "
        "fastest peer's over the row's (> 1: faster); of limit: the achieved GB/s or TFLOP/s over a "
        "device copy's or a same-dtype matmul's in the same run.",
        "",
    ]
    if report["summary"]:
        lines += [
            "## Summary",
            "",
            "The dlfast backend with the best geometric mean vs torch, its range over the shapes.",
            "",
        ]
        lines += summary_table(report["summary"]) + [""]
    sources = {s["file"]: s for s in report["sources"]}
    for file, source in sources.items():
        rows = [r for r in report["op_rows"] if r["source"] == file]
        for op in dict.fromkeys(r["op"] for r in rows):
            lines += _op_section(source, op, [r for r in rows if r["op"] == op], plots.get((file, op), []))
        models = [r for r in report["model_rows"] if r["source"] == file]
        if models:
            lines += _model_section(source, models)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# Plots


def _limit(source: dict, rows: list[dict], unit: str, dtype: str) -> float | None:
    """The device limit of a panel: the run's copy GB/s or matmul TFLOP/s, else what the rows imply."""
    if unit == "GB/s" and source["copy_gbps"]:
        return source["copy_gbps"]
    if unit == "TFLOP/s" and (source["matmul_tflops"] or {}).get(dtype):
        return source["matmul_tflops"][dtype]
    key = "gbps" if unit == "GB/s" else "tflops"
    implied = [r[key] / r["frac_of_limit"] for r in rows if r[key] and r["frac_of_limit"]]
    return sorted(implied)[len(implied) // 2] if implied else None


def _draw_panel(ax, source: dict, op: str, dtype: str, variant: tuple, group: list[dict], unit: str) -> None:
    """One panel: a line per backend (dlfast solid, peers dashed) and the device limit."""
    key = "tflops" if unit == "TFLOP/s" else "gbps"
    x_dim = X_DIM.get(op)
    hidden = {d for d, _ in variant}

    def label(shape: dict) -> str:
        return "x".join(str(v) for d, v in shape.items() if d not in hidden)

    labels = list(dict.fromkeys(label(r["shape"]) for r in group))
    values = []
    for backend in dict.fromkeys(r["backend"] for r in group):
        mine = [r for r in group if r["backend"] == backend]
        xs = [r["shape"][x_dim] if x_dim else labels.index(label(r["shape"])) for r in mine]
        values += [r[key] for r in mine]
        style = "-" if mine[0]["kind"] == "dlfast" else "--"
        ax.plot(xs, [r[key] for r in mine], style, marker="o", markersize=3, label=backend)
    limit = _limit(source, group, unit, dtype)
    if limit:
        ax.axhline(limit, color="black", linestyle=":", linewidth=1, label="device limit")
    # Throughputs a decade or more apart (or far under the limit) read better on a log axis.
    if max([*values, limit or 0]) > 30 * min(values):
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    if x_dim:
        ax.set_xscale("log", base=10 if x_dim == "tokens" else 2)
        ax.set_xlabel(x_dim)
    else:
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_xlabel(" x ".join(d for d in group[0]["shape"] if d not in hidden))
    ax.set_ylabel(unit)
    ax.set_title(" ".join([dtype, *(f"{d}={v}" for d, v in variant)]), fontsize=9)
    ax.grid(alpha=0.3)


def plot_op(source: dict, op: str, rows: list[dict], out: Path) -> list[str]:
    """One PNG per pass: throughput against size, a line per backend and peer, a panel per dtype and
    variant, the device limit as a dotted horizontal line. Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for pass_ in dict.fromkeys(r["pass"] for r in rows):
        timed = [r for r in rows if r["pass"] == pass_ and (r["gbps"] or r["tflops"])]
        if not timed:
            continue
        unit = "TFLOP/s" if timed[0]["tflops"] else "GB/s"
        panels: dict[tuple, list[dict]] = {}
        for r in timed:
            variant = tuple((d, r["shape"][d]) for d in PANEL_DIMS.get(op, ()) if d in r["shape"])
            panels.setdefault((r["dtype"], variant), []).append(r)
        ncols = min(len(panels), 4)
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(3.6 * ncols + 1.6, 3.2 * nrows), squeeze=False, layout="constrained"
        )
        for ax, ((dtype, variant), group) in zip(axes.flat, panels.items(), strict=False):
            _draw_panel(ax, source, op, dtype, variant, group, unit)
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        handles = {}
        for ax in axes.flat:
            for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(text, handle)
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=8)
        fig.suptitle(f"{op} {pass_}: {source['device']} ({source['file']})", fontsize=10)
        filename = f"{_plot_stem(source, op)}-{pass_.replace('+', '_')}.png"
        fig.savefig(out / filename, dpi=80, metadata={"Software": None})
        plt.close(fig)
        written.append(filename)
    return written


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(
    documents: list[tuple[Path, dict]], out: Path, title: str, with_json: bool = True, with_plots: bool = True
) -> dict:
    """Writes report.md (and report.json, and the plots) of these results into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    report = build(documents)
    plots: dict[tuple[str, str], list[str]] = {}
    if with_plots and not _have_matplotlib():
        print("note: matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        with_plots = False
    sources = {s["file"]: s for s in report["sources"]}
    for file, source in sources.items():
        rows = [r for r in report["op_rows"] if r["source"] == file]
        for op in dict.fromkeys(r["op"] for r in rows):
            mine = [r for r in rows if r["op"] == op]
            plots[file, op] = plot_op(source, op, mine, out) if with_plots else plot_names(source, op, mine)
    report["plots"] = [p for names in plots.values() for p in names]
    (out / "report.md").write_text(markdown(report, plots, title))
    if with_json:
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _plot_stem(source: dict, op: str) -> str:
    stem = source["file"].removesuffix(".json").replace("/", "-")
    return stem if Path(source["file"]).stem.startswith(op) else f"{stem}-{op}"


def plot_names(source: dict, op: str, rows: list[dict]) -> list[str]:
    """The file names plot_op writes for these rows, without drawing them."""
    name = _plot_stem(source, op)
    passes = dict.fromkeys(r["pass"] for r in rows if r["gbps"] or r["tflops"])
    return [f"{name}-{p.replace('+', '_')}.png" for p in passes]


# ---------------------------------------------------------------------------------------------
# Committed results: per-device reports and the README block


def device_dirs(results: Path = RESULTS) -> list[Path]:
    return sorted(p for p in results.iterdir() if p.is_dir() and any(p.glob("*.json")))


def committed_markdown(directory: Path) -> str:
    """The report.md of one committed device directory, as write_report writes it."""
    report = build(load_results(expand([directory])))
    sources = {s["file"]: s for s in report["sources"]}
    plots = {}
    for file, source in sources.items():
        rows = [r for r in report["op_rows"] if r["source"] == file]
        for op in dict.fromkeys(r["op"] for r in rows):
            plots[file, op] = plot_names(source, op, [r for r in rows if r["op"] == op])
    return markdown(report, plots, _device_title(directory, report))


def _device_title(directory: Path, report: dict) -> str:
    devices = list(dict.fromkeys(s["device"] for s in report["sources"]))
    return f"Benchmark results: {directory.name} ({', '.join(devices)})"


def readme_block(results: Path = RESULTS) -> str:
    """The README performance block (markers included) from the committed results."""
    intro = (
        "Per device, the dlfast backend with the best geometric mean against PyTorch's eager op, in the "
        "pass that matters in training (forward and backward; the count for bigram counting): vs torch "
        "and vs the fastest peer (> 1: dlfast is faster) as ranges over the measured shapes, and the "
        "achieved throughput as a fraction of the device limit measured in the same run (a copy's GB/s, "
        "or a same-dtype matmul's TFLOP/s). The backend defaults (`DEFAULTS` in `dlfast/backends.py`) "
        "are derived from the same files by `python -m dlfast.bench.report --defaults`."
    )
    lines = [
        PERF_BEGIN,
        "<!-- generated by python -m dlfast.bench.report --readme from benchmarks/results/: do not edit -->",
        "",
        *textwrap.wrap(intro, 100, break_on_hyphens=False, break_long_words=False),
    ]
    for directory in device_dirs(results):
        documents = load_results(expand([directory]))
        report = build(documents)
        if not report["sources"]:
            continue
        first = report["sources"][0]
        rel = directory.relative_to(ROOT).as_posix()
        lines += [
            "",
            f"**{directory.name}**: {first['device']}, torch {first['torch']}: "
            f"[full report and plots]({rel}/report.md)",
            "",
        ]
        lines += summary_table(summarise(report["op_rows"], only_deciding=True), with_pass=False)
        if report["model_rows"]:
            lines += ["", *_model_summary(report["model_rows"])]
    lines.append(PERF_END)
    return "\n".join(lines) + "\n"


def _model_summary(rows: list[dict]) -> list[str]:
    table = [
        [
            str(r.get("model")),
            str(r.get("mode")),
            str(r.get("dtype")),
            "-" if r.get("vs_twin_eager") is None else f"{r['vs_twin_eager']:.2f}x",
            "-" if r.get("vs_twin_compiled") is None else f"{r['vs_twin_compiled']:.2f}x",
        ]
        for r in rows
        if r.get("impl") == "dlfast"
    ]
    return _table(["model (training step)", "mode", "dtype", "vs twin eager", "vs twin compiled"], table)


def replace_between(text: str, begin: str, end: str, block: str) -> str:
    """`text` with the span from `begin` to the end of the `end` line replaced by `block`."""
    start = text.index(begin)
    stop = text.index(end, start) + len(end)
    if text[stop : stop + 1] == "\n":
        stop += 1
    return text[:start] + block + text[stop:]


def _update(path: Path, new: str, check: bool) -> bool:
    """Writes `new` to `path` unless it is there already; with check, only says. True: up to date."""
    old = path.read_text() if path.exists() else None
    if old == new:
        return True
    if check:
        print(
            f"out of date: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", file=sys.stderr
        )
        return False
    path.write_text(new)
    print(f"wrote {path}")
    return True


# ---------------------------------------------------------------------------------------------
# The CPU regression suite: dlfast / torch per case against the baseline's


def case_ratios(document: dict, stat: str = "min") -> dict[str, float]:
    """pytest-benchmark JSON -> {group: dlfast's stat / torch's stat}."""
    times: dict[str, dict[str, float]] = {}
    for bench in document["benchmarks"]:
        impl = (bench.get("params") or {}).get("impl")
        times.setdefault(bench["group"], {})[impl] = bench["stats"][stat]
    return {g: t["dlfast"] / t["torch"] for g, t in times.items() if "dlfast" in t and "torch" in t}


def regression(run: dict, baseline: dict, factor: float, stat: str = "min") -> list[dict]:
    """Per case: the baseline's and this run's dlfast/torch ratio and whether it got worse than
    factor times the baseline's (a case missing from the run fails too)."""
    now, base = case_ratios(run, stat), case_ratios(baseline, stat)
    out = []
    for case in dict.fromkeys([*base, *now]):
        b, n = base.get(case), now.get(case)
        change = None if b is None or n is None else n / b
        if n is None:
            status = "missing"
        elif b is None:
            status = "new"
        else:
            status = "worse" if change > factor else "ok"
        out.append({"case": case, "baseline": b, "run": n, "change": change, "status": status})
    return out


def regression_markdown(rows: list[dict], factor: float, stat: str, run: dict, baseline: dict) -> str:
    def info(doc: dict) -> str:
        commit = (doc.get("commit_info") or {}).get("id") or "?"
        cpu = ((doc.get("machine_info") or {}).get("cpu") or {}).get("brand_raw") or "?"
        return f"{cpu}, commit {commit[:10]}, {doc.get('datetime', '?')[:19]}"

    def ratio(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    table = [
        [
            r["case"],
            ratio(r["baseline"]),
            ratio(r["run"]),
            "-" if r["change"] is None else f"{r['change']:.2f}x",
            r["status"],
        ]
        for r in rows
    ]
    failed = [r["case"] for r in rows if r["status"] in ("worse", "missing")]
    lines = [
        "# CPU kernels against PyTorch: this run against the baseline",
        "",
        f"dlfast / torch time ({stat} of the rounds) per case; a case fails when its ratio is more than "
        f"{factor}x the baseline's.",
        "",
        f"- baseline: {info(baseline)}",
        f"- this run: {info(run)}",
        "",
        *_table(["case", "baseline dlfast/torch", "this run", "change", "status"], table),
        "",
        f"FAILED: {', '.join(failed)}" if failed else "All cases within the factor.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dlfast.bench.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("paths", nargs="*", help="benchmark JSON files or directories of them")
    parser.add_argument("--out", default=None, help="where to write (default: build/bench/report)")
    parser.add_argument("--title", default="Benchmark report", help="report.md's title")
    parser.add_argument(
        "--committed", action="store_true", help="report.md and plots of benchmarks/results/*/"
    )
    parser.add_argument("--readme", action="store_true", help="the performance block of README.md")
    parser.add_argument("--defaults", action="store_true", help="the DEFAULTS block of dlfast/backends.py")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 where out of date")
    parser.add_argument("--regression", metavar="RUN", help="pytest-benchmark JSON of this run")
    parser.add_argument("--baseline", metavar="BASE", help="pytest-benchmark JSON of the baseline")
    parser.add_argument(
        "--update-baseline", action="store_true", help="first make RUN (without its per-round times) BASE"
    )
    parser.add_argument(
        "--factor", type=float, default=1.5, help="allowed worsening of a ratio (default 1.5)"
    )
    parser.add_argument("--stat", default="min", choices=["median", "min", "mean"], help="per benchmark")
    args = parser.parse_args(argv)

    if args.regression:
        if not args.baseline:
            parser.error("--regression needs --baseline")
        if args.update_baseline:
            run = json.loads(Path(args.regression).read_text())
            for bench in run["benchmarks"]:
                bench["stats"].pop("data", None)
            Path(args.baseline).write_text(json.dumps(run, indent=1) + "\n")
            print(f"wrote {args.baseline}")
        run, base = (json.loads(Path(p).read_text()) for p in (args.regression, args.baseline))
        rows = regression(run, base, args.factor, args.stat)
        text = regression_markdown(rows, args.factor, args.stat, run, base)
        print(text)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "comparison.md").write_text(text)
            (out / "comparison.json").write_text(
                json.dumps({"factor": args.factor, "stat": args.stat, "cases": rows}, indent=1) + "\n"
            )
        return 1 if any(r["status"] in ("worse", "missing") for r in rows) else 0

    ok = True
    generated = args.committed or args.readme or args.defaults
    if args.committed:
        for directory in device_dirs():
            if args.check:
                ok &= _update(directory / "report.md", committed_markdown(directory), check=True)
            else:
                documents = load_results(expand([directory]))
                title = _device_title(directory, build(documents))
                write_report(documents, directory, title, with_json=False)
                print(f"wrote {directory / 'report.md'} and its plots")
    if args.readme:
        ok &= _update(
            README, replace_between(README.read_text(), PERF_BEGIN, PERF_END, readme_block()), args.check
        )
    if args.defaults:
        text = defaults.BACKENDS_PY.read_text()
        ok &= _update(defaults.BACKENDS_PY, defaults.replace_block(text, defaults.render()), args.check)
    if generated:
        return 0 if ok else 1

    if not args.paths:
        parser.error(
            "give benchmark JSON files or directories, or one of --committed --readme --defaults --regression"
        )
    documents = load_results(expand(args.paths))
    if not documents:
        print(f"error: no benchmark results in {args.paths}", file=sys.stderr)
        return 1
    out = Path(args.out or "build/bench/report")
    report = write_report(documents, out, args.title)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'} and {len(report['plots'])} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
