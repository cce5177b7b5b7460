"""`python -m dlfast bench`: times dlfast's kernels against their peers, in one run, on one device.

Every op has a module in dlfast.bench, named in OPS, that provides:

    PASSES: tuple[str, ...]                       the passes it times, e.g. ("fwd", "bwd", "fwd+bwd")
    cases(device, quick) -> list[Case]            the dtypes and shapes of the sweep
    implementations(device, note) -> list[Impl]   dlfast backends and peers that can run here
                                                  (note(text) records why something is left out)
    prepare(case, impls, device)                  -> {impl name: {pass: Timed} or the exception that
                                                  stopped it}; checks each result against the
                                                  PyTorch op in fp32 before anything is timed
    work(case, pass) -> Work                      bytes moved and/or floating-point operations, and
                                                  tokens read for an op over a token stream

The peer named "torch" is PyTorch's eager op; every row's vs_torch is its time over the row's
time, and vs_best_peer the fastest peer's time over the row's time (> 1: the row is faster).
Each row is a flat dict (see ROW_KEYS), so the JSON of every op has the same schema.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import functools
import importlib
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# op name -> module that defines its cases.
OPS: dict[str, str] = {
    "layer_norm": "dlfast.bench.layer_norm",
    "attention": "dlfast.bench.attention",
    "conv2d_relu": "dlfast.bench.conv2d_relu",
    "bigram_counts": "dlfast.bench.ngram_counts",
}

EAGER_PEER = "torch"

# The JSON document: {"schema": SCHEMA, "meta": {...}, "notes": [...], "rows": [{ROW_KEYS}, ...]}.
SCHEMA = "dlfast-bench/1"

ROW_KEYS = (
    "op",  # "layer_norm"
    "pass",  # "fwd", "bwd", "fwd+bwd"
    "dtype",  # "bfloat16", "float32"
    "shape",  # {dim name: size}, e.g. {"M": 4096, "N": 1024}
    "backend",  # a dlfast backend ("cuda", "triton", "cpu") or a peer ("torch", "torch.compile", ...)
    "kind",  # "dlfast" or "peer"
    "median_ms",
    "gbps",  # achieved GB/s (1e9 bytes) by the op's bytes-moved model, or None
    "tflops",  # achieved TFLOP/s for compute-bound ops, or None
    "tokens_per_s",  # tokens read per second, for ops over a token stream (bigram counting), else None
    "frac_of_limit",  # tflops / a same-dtype matmul's TFLOP/s, else gbps / copy GB/s, same run
    "vs_torch",  # eager torch time / this time
    "vs_best_peer",  # fastest peer's time / this time
)


@dataclass(frozen=True)
class Case:
    """One point of a sweep: a dtype and named dims."""

    dtype: torch.dtype
    shape: dict[str, int]

    def label(self) -> str:
        return "x".join(str(v) for v in self.shape.values())


@dataclass(frozen=True)
class Impl:
    """One implementation of an op: a dlfast backend or a peer.

    make() is called once per case and returns the function to time, so that a compiled peer
    can start from an empty cache at every case. options carries op-specific facts about the
    implementation (e.g. that it has no bias).
    """

    name: str
    kind: str  # "dlfast" or "peer"
    make: Callable[[], Callable]
    options: dict = field(default_factory=dict)


def dlfast_impls(
    device: torch.device, note: Callable[[str], None], make: Callable[[str], Callable]
) -> list[Impl]:
    """An Impl per dlfast kernel backend ("cuda", "triton", "cpu") that runs on `device`, each
    made by make(backend); note() says why one is left out. The reference backend is slow by
    design and "torch" is the eager peer, so neither is listed."""
    from dlfast import backends

    impls = []
    for name in ("cuda", "triton", "cpu"):
        if not backends.runs_on(name, device):
            continue
        reason = backends.unavailable_reason(name)
        if reason is not None:
            note(f"dlfast backend {name} not benchmarked: {reason}")
        elif name == "triton" and device.type == "cpu":
            note("dlfast backend triton not benchmarked on the CPU: TRITON_INTERPRET=1 is a debugging aid")
        else:
            impls.append(Impl(name, "dlfast", functools.partial(make, name)))
    return impls


@dataclass
class Timed:
    """A callable to time; the gradients of `grads` are set to None before every call (outside
    the timed region), so that a backward pass writes fresh gradients instead of accumulating."""

    fn: Callable[[], object]
    grads: list[torch.Tensor] = field(default_factory=list)

    def reset(self) -> None:
        for t in self.grads:
            t.grad = None


@dataclass(frozen=True)
class Work:
    """What one call does, for the achieved-throughput columns."""

    bytes: int | None = None
    flops: int | None = None
    tokens: int | None = None


def row_work(row: dict) -> Work:
    """The Work of the case a row was timed on, by its op's own model: for figures that rows
    written before a column existed can be given from their shape and median time."""
    module = importlib.import_module(OPS[row["op"]])
    return module.work(Case(getattr(torch, row["dtype"]), dict(row["shape"])), row["pass"])


def tokens_per_s(work: Work, ms: float) -> float | None:
    """Tokens read per second at `ms` per call; None where the op reads no token stream."""
    return None if work.tokens is None else work.tokens / (ms / 1e3)


def write_json(path: str, schema: str, meta: dict, notes: list[str], rows: list[dict]) -> None:
    """Writes {"schema", "meta", "notes", "rows"} to path, creating its folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"schema": schema, "meta": meta, "notes": notes, "rows": rows}
    out.write_text(json.dumps(document, indent=1) + "\n")


def print_summary(meta: dict, headline: str, table: str, notes: list[str]) -> None:
    """The end of a benchmark run on stdout: device and torch, headline, the table, the notes."""
    print(f"\n{meta['device']}, torch {meta['torch']}, {headline}")
    print(table)
    for text in notes:
        print(f"note: {text}")
    print(f"({meta['seconds']} s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `python -m dlfast bench` to `parser`."""
    parser.add_argument(
        "--op", default="all", choices=["all", *OPS], help="the op to benchmark (default: every op)"
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="where to run (default: cuda when a GPU is visible, else cpu)",
    )
    parser.add_argument("--quick", action="store_true", help="a small subset, for a smoke test in CI")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write rows and metadata here")
    parser.add_argument(
        "--only",
        metavar="DIM=SIZE",
        action="append",
        default=[],
        help="only the cases whose shape has this size, e.g. --only D=128 (repeatable)",
    )
    from dlfast.bench.models import MODELS

    parser.add_argument(
        "--model",
        action="append",
        choices=["all", *MODELS],
        help="instead of the ops, time training steps of this dlfast model against its plain-PyTorch "
        "twin, eager and compiled (repeatable; see dlfast/bench/models.py)",
    )


# ---------------------------------------------------------------------------------------------
# Timing

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
CPU_KEPT_MEMORY_BYTES = 256 * 2**20


def keep_freed_memory(nbytes: int = CPU_KEPT_MEMORY_BYTES) -> bool:
    """Tells glibc's malloc to keep freed buffers up to `nbytes` for reuse; False elsewhere.

    With its defaults, a buffer of a MiB or more is sometimes mapped afresh (and every page of it
    faulted in, ~3 us a page on the 2-core VMs) and sometimes reused, depending on what was freed
    before: PyTorch's fp32 NCHW convolution forward measured 4.7 ms in one run and 14.9 ms in the
    next, identical one. CUDA timings never see this (PyTorch's caching allocator reuses device
    memory), so the CPU runs keep freed memory too, and both measure the kernels.
    """
    libc = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc), "mallopt", None) if libc else None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, nbytes)) and bool(mallopt(_M_TRIM_THRESHOLD, nbytes))


@functools.cache
def _cpu_flush_buffer() -> torch.Tensor:
    # 128 MiB: 4x the 32 MiB L3 of the 2-core machines this project runs on.
    return torch.ones(128 * 2**20 // 4, dtype=torch.int32)


def _flush_cpu_caches() -> None:
    """Evicts the previous call's tensors from the CPU caches.

    It reads rather than writes the buffer, so that the lines it leaves behind are clean and the
    next call does not pay for writing them back to memory.
    """
    _cpu_flush_buffer().max()


def _time_cpu(fns: dict[str, Timed], quick: bool) -> dict[str, float]:
    """Median milliseconds per call of each function, timed call by call with perf_counter.

    The functions take turns (one call each per round) so that the slow drifts of a shared
    2-core machine (another process, frequency changes) fall on all of them alike and cancel
    in the ratios. Before every call a buffer larger than the last-level cache is read, so
    that each call reads its inputs from memory, as do_bench arranges on the GPU, and a case
    whose tensors happen to fit in the cache does not pass the copy's bandwidth.
    """
    warmup, rounds = (1, 7) if quick else (3, 25)
    for t in fns.values():
        for _ in range(warmup):
            t.reset()
            t.fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, t in fns.items():
            t.reset()
            _flush_cpu_caches()
            start = time.perf_counter()
            t.fn()
            samples[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def _time_cuda(fns: dict[str, Timed], quick: bool) -> dict[str, float]:
    """Median milliseconds per call of each function by triton.testing.do_bench.

    do_bench synchronises the device, times with CUDA events, clears the L2 cache before every
    call (so a case smaller than the 50 MB L2 of an H100 still reads from HBM) and sets the
    gradients of grad_to_none to None outside the timed region.
    """
    from triton.testing import do_bench  # lazily: triton is an optional dependency

    warmup_ms, rep_ms = (10, 30) if quick else (25, 100)
    out = {}
    for name, t in fns.items():
        out[name] = do_bench(
            t.fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=t.grads or None, return_mode="median"
        )
    torch.cuda.synchronize()
    return out


def time_calls(fns: dict[str, Timed], device: torch.device, quick: bool) -> dict[str, float]:
    """Median milliseconds per call of each of `fns` on `device`."""
    if device.type == "cuda":
        return _time_cuda(fns, quick)
    return _time_cpu(fns, quick)


def measure_copy_gbps(device: torch.device, quick: bool) -> tuple[float, int]:
    """GB/s of dst.copy_(src) over a buffer far larger than the caches; returns (GB/s, buffer bytes).

    A copy reads and writes every byte, so it moves twice the buffer: that is the practical
    bandwidth limit each row is compared with.
    """
    nbytes = (256 if device.type == "cuda" else 64) * 2**20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    ms = time_calls({"copy": Timed(lambda: dst.copy_(src))}, device, quick)["copy"]
    return 2 * nbytes / (ms * 1e6), nbytes


# Matmul TFLOP/s per dtype measured in this run, by measure_matmul_tflops (recorded in the meta).
_MATMUL_TFLOPS: dict[torch.dtype, float] = {}


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """TFLOP/s of a square matmul in `dtype` (measured once per run): the practical compute limit
    that rows of compute-bound ops (attention, convolution) are compared with.

    On the CPU the same product is also timed through oneDNN's matmul (the linear op inductor's CPU
    backend calls), and the faster counts. PyTorch hands a float32 CPU matmul to MKL, which on the
    AMD EPYC VMs ran at 0.19-0.22 TFLOP/s where oneDNN's reached 0.47, about the two cores' FMA
    peak: with MKL's figure as the limit, oneDNN's own convolutions showed twice "the limit"."""
    if dtype not in _MATMUL_TFLOPS:
        n = 8192 if device.type == "cuda" else 1024
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        fns = {"matmul": Timed(lambda: a @ b)}
        if device.type == "cpu":
            try:
                onednn_linear = torch.ops.mkldnn._linear_pointwise.default
                onednn_linear(a, b, None, "none", [], "")
                fns["oneDNN matmul"] = Timed(lambda: onednn_linear(a, b, None, "none", [], ""))
            except (AttributeError, RuntimeError):
                pass  # a torch without oneDNN, or a dtype this CPU's oneDNN has no kernel for
        ms = min(time_calls(fns, device, quick).values())
        _MATMUL_TFLOPS[dtype] = 2 * n**3 / (ms * 1e9)
    return _MATMUL_TFLOPS[dtype]


# ---------------------------------------------------------------------------------------------
# Metadata


def _git_commit() -> tuple[str | None, bool | None]:
    """(HEAD's hash, whether the tree has uncommitted changes) of the checkout dlfast runs from."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10
        )
        return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_busy(seconds: float = 0.5) -> float | None:
    """Fraction of all cores that other processes kept busy over `seconds` while this one slept
    (from /proc/stat; None where there is none)."""

    def busy_and_total() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = busy_and_total()
        time.sleep(seconds)
        busy1, total1 = busy_and_total()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(total1 - total0, 1)


def metadata(device: torch.device, quick: bool) -> dict:
    """What the figures of this run were measured on."""
    import dlfast

    commit, dirty = _git_commit()
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
        timer = "triton.testing.do_bench, median, L2 cleared before each call"
    else:
        name = _cpu_name()
        timer = (
            "time.perf_counter per call, median of interleaved rounds, caches flushed before each "
            "call, freed memory kept by malloc (as CUDA's caching allocator keeps it)"
        )
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "device": name,
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "dlfast": dlfast.__version__,
        "dlfast_backends": dlfast.available_backends(),
        "git_commit": commit,
        "git_dirty": dirty,
        "quick": quick,
        "timer": timer,
        # Other processes on a small shared machine stretch CPU timings: say how busy it was.
        "cpu_busy_before": _cpu_busy(),
    }


# ---------------------------------------------------------------------------------------------
# Running


def _ratio(num: float | None, den: float) -> float | None:
    return None if num is None else num / den


def _time_case(
    module,
    op: str,
    case: Case,
    ready: dict[str, dict[str, Timed]],
    kinds: dict[str, str],
    device: torch.device,
    quick: bool,
    copy_gbps: float,
) -> list[dict]:
    """Times every pass of one case; returns its rows."""
    dtype = str(case.dtype).removeprefix("torch.")
    rows = []
    for pass_ in module.PASSES:
        times = time_calls({name: timed[pass_] for name, timed in ready.items()}, device, quick)
        work = module.work(case, pass_)
        eager = times.get(EAGER_PEER)
        peer_times = [ms for name, ms in times.items() if kinds[name] == "peer"]
        best_peer = min(peer_times) if peer_times else None
        matmul_tflops = None if work.flops is None else measure_matmul_tflops(device, case.dtype, quick)
        for name, ms in times.items():
            gbps = None if work.bytes is None else work.bytes / (ms * 1e6)
            tflops = None if work.flops is None else work.flops / (ms * 1e9)
            rows.append(
                {
                    "op": op,
                    "pass": pass_,
                    "dtype": dtype,
                    "shape": dict(case.shape),
                    "backend": name,
                    "kind": kinds[name],
                    "median_ms": ms,
                    "gbps": gbps,
                    "tflops": tflops,
                    "tokens_per_s": tokens_per_s(work, ms),
                    "frac_of_limit": tflops / matmul_tflops
                    if tflops is not None
                    else _ratio(gbps, copy_gbps),
                    "vs_torch": _ratio(eager, ms),
                    "vs_best_peer": _ratio(best_peer, ms),
                }
            )
    return rows


def _bench_op(
    op: str,
    device: torch.device,
    quick: bool,
    copy_gbps: float,
    notes: list[str],
    rows: list[dict],
    after_case: Callable[[], None],
    only: list[tuple[str, str]] = (),
) -> int:
    """Runs every case of `op`, appending to `rows` and calling after_case() after each case;
    returns the number of dlfast implementations that failed. `only`: (dim, size) pairs a case's
    shape must match."""

    def note(text: str) -> None:
        notes.append(f"{op}: {text}")
        print(f"note: {op}: {text}", file=sys.stderr, flush=True)

    module = importlib.import_module(OPS[op])
    impls = module.implementations(device, note)
    disabled: set[str] = set()
    failures = 0
    for case in module.cases(device, quick):
        if any(str(case.shape.get(dim)) != size for dim, size in only):
            continue
        where = f"{str(case.dtype).removeprefix('torch.')} {case.label()}"
        print(f"{op} {where} ...", file=sys.stderr, flush=True)
        live = [impl for impl in impls if impl.name not in disabled]
        ready: dict[str, dict[str, Timed]] = {}
        for name, result in module.prepare(case, live, device).items():
            if not isinstance(result, BaseException):
                ready[name] = result
            elif name in {impl.name for impl in live if impl.kind == "dlfast"}:
                failures += 1
                note(f"dlfast backend {name} failed at {where}: {result!r}")
            else:
                # A peer that fails once (e.g. torch.compile without a working compiler) is left
                # out of the remaining cases instead of failing at every one.
                disabled.add(name)
                note(f"peer {name} skipped from {where} on: {result!r}")
        kinds = {impl.name: impl.kind for impl in live}
        rows += _time_case(module, op, case, ready, kinds, device, quick, copy_gbps)
        after_case()
        # Free this case's tensors before the next case allocates its own.
        del ready
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return failures


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table, a blank line between (op, dtype, shape, pass) groups;
    a tokens/s column where some op reads a token stream."""
    with_tokens = any(row["tokens_per_s"] is not None for row in rows)
    header = [
        "op",
        "pass",
        "dtype",
        "shape",
        "backend",
        "ms",
        "GB/s|TFLOP/s",
        *(["tokens/s"] if with_tokens else []),
        "of limit",
        "vs torch",
        "vs best peer",
    ]
    lines = [header]
    breaks = set()
    previous = None
    for row in rows:
        shape = "x".join(str(v) for v in row["shape"].values())
        group = (row["op"], row["dtype"], shape, row["pass"])
        if previous is not None and group != previous:
            breaks.add(len(lines))
        previous = group
        lines.append(
            [
                row["op"],
                row["pass"],
                row["dtype"],
                shape,
                row["backend"],
                _fmt(row["median_ms"], ".4f"),
                _fmt(row["gbps"] if row["tflops"] is None else row["tflops"], ".1f"),
                *([_fmt(row["tokens_per_s"], ".3g")] if with_tokens else []),
                _fmt(None if row["frac_of_limit"] is None else 100 * row["frac_of_limit"], ".0f") + "%",
                _fmt(row["vs_torch"], ".2f") + "x",
                _fmt(row["vs_best_peer"], ".2f") + "x",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    for i, line in enumerate(lines):
        if i in breaks:
            text.append("")
        # Names left-aligned, numbers right-aligned.
        cells = [
            cell.ljust(width) if j < 5 else cell.rjust(width)
            for j, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        text.append("  ".join(cells).rstrip())
    return "\n".join(text)


def run(args: argparse.Namespace) -> int:
    """Runs `python -m dlfast bench`; returns the exit code (1 when a dlfast kernel failed or was wrong)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA GPU here", file=sys.stderr)
        return 2
    if device.type == "cpu":
        keep_freed_memory()  # before anything is allocated, for the op and the model benchmarks
    if getattr(args, "model", None):
        from dlfast.bench import models

        return models.run(args, device)
    ops = list(OPS) if args.op == "all" else [args.op]
    try:
        only = [tuple(item.split("=", 1)) for item in args.only]
        if any(len(pair) != 2 for pair in only):
            raise ValueError
    except ValueError:
        print(f"error: --only takes DIM=SIZE, got {args.only}", file=sys.stderr)
        return 2
    started = time.perf_counter()

    meta = metadata(device, args.quick)
    copy_gbps, copy_bytes = measure_copy_gbps(device, args.quick)
    meta.update(copy_gbps=copy_gbps, copy_bytes=copy_bytes)
    print(f"device: {meta['device']} ({device.type}); copy: {copy_gbps:.1f} GB/s", file=sys.stderr)
    busy = meta["cpu_busy_before"]
    if device.type == "cpu" and busy is not None and busy > 0.1:
        print(
            f"warning: other processes kept {100 * busy:.0f}% of the CPU busy just before the run: "
            "CPU timings will be stretched and noisy",
            file=sys.stderr,
        )

    rows: list[dict] = []
    notes: list[str] = []

    def save(complete: bool) -> None:
        """Writes the JSON so far: a run stopped by a time limit still leaves its finished cases."""
        if not args.json:
            return
        meta["complete"] = complete
        meta["seconds"] = round(time.perf_counter() - started, 1)
        meta["matmul_tflops"] = {
            str(dtype).removeprefix("torch."): tflops for dtype, tflops in _MATMUL_TFLOPS.items()
        }
        write_json(args.json, SCHEMA, meta, notes, rows)

    failures = 0
    for op in ops:
        failures += _bench_op(
            op, device, args.quick, copy_gbps, notes, rows, functools.partial(save, False), only
        )
    meta["seconds"] = round(time.perf_counter() - started, 1)

    headline = f"copy {copy_gbps:.1f} GB/s; vs torch and vs best peer: > 1 means faster"
    print_summary(meta, headline, format_table(rows), notes)
    if args.json:
        save(True)
        print(f"wrote {args.json}")
    if failures:
        print(f"error: {failures} dlfast implementation(s) failed; see the notes", file=sys.stderr)
        return 1
    if not rows:
        print("error: nothing was timed", file=sys.stderr)
        return 1
    return 0
