"""`python -m dlfast bench --model gpt|resnet`: training throughput of a dlfast model against its
plain-PyTorch twin, eager and under torch.compile, in one run, on one device.

The twin is dlfast.nn.revert of a deep copy of the dlfast model: the same weights, with every
dlfast layer swapped back to its torch.nn counterpart. Four copies of the model train side by
side, from the same weights on the same fixed batch, each with its own AdamW (PyTorch's default
implementation for the device): dlfast and twin, each eager and compiled. One step is
zero_grad(set_to_none=True), forward and loss (under bf16 autocast with fp32 weights, as a GPT is
trained on CUDA; on the CPU also in plain fp32), backward, optimizer step.

The first step of every copy is the check: its loss and every parameter gradient are compared
with the twin's in the same mode before anything is timed (a benchmark of a wrong model is
worthless), and for a compiled copy it is also where compilation happens (compile_s). Then come
warm-up steps, then timed rounds in which the copies take turns, one step each per round, so
that the slow drifts of a shared machine fall on all of them alike; median_step_ms is the median
of a copy's timed steps, each timed with perf_counter between device synchronisations.

peak_mem_mb is the tensor memory a copy would need if it trained alone: the parameters, gradients
and optimizer state it holds between steps, plus the most that a step's own tensors held above
them at once. On CUDA the caching allocator's statistics give it over the timed steps; the CPU has
no such statistics, so there it comes from torch.profiler's memory events over one extra,
untimed step (_cpu_step_peak_bytes says why and what that leaves out).

The JSON document: {"schema": SCHEMA, "meta": {...}, "notes": [...], "rows": [{ROW_KEYS}, ...]},
with the meta of runner.metadata.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCHEMA = "dlfast-bench-models/1"

MODELS = ("gpt", "resnet")

ROW_KEYS = (
    "model",  # "gpt", "resnet"
    "config",  # the model constructor's arguments and "batch_size"
    "dtype",  # "bfloat16" (autocast over fp32 weights) or "float32"
    "impl",  # "dlfast" or "twin" (dlfast.nn.revert of a copy: plain PyTorch)
    "mode",  # "eager" or "compile" (torch.compile, default options)
    "median_step_ms",
    "throughput",  # units per second: items per step / median step time
    "unit",  # "tokens/s" or "images/s"
    "peak_mem_mb",  # what the copy holds between steps plus its step's tensors at their peak, MiB
    "compile_s",  # compiled rows: wall seconds of the first (compiling) step
    "vs_twin_eager",  # the eager twin's step time / this row's
    "vs_twin_compiled",  # the compiled twin's step time / this row's
    "error",  # why the row has no time (failed, wrong, skipped), else None
)

# (impl, mode) in the order of the rows.
COPIES = (("dlfast", "eager"), ("dlfast", "compile"), ("twin", "eager"), ("twin", "compile"))

# Relative error allowed against the twin in the same mode at the first step: the loss, and all
# parameter gradients together (2-norm of the difference over the 2-norm of the twin's). The two
# differ only in summation order in fp32; under bf16 autocast every matmul and attention output
# is rounded to 2^-8, and that compounds over a dozen layers. As in the op benchmarks this guards
# against timing a broken model (which is off by O(1) or NaN); tests/ prove correctness.
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
GRAD_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-1}

# Setting DLFAST_BENCH_COMPILE=0 skips the compiled copies (their rows then say so): inductor's C++
# compilation is the slow part of a CPU run.
COMPILE_ENV = "DLFAST_BENCH_COMPILE"


@dataclass(frozen=True)
class Workload:
    """One model to train: how to build it and its batch, its loss, and what a step processes."""

    model: str
    config: dict  # the constructor's arguments
    batch_size: int
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device, torch.Generator], tuple[Tensor, Tensor]]
    loss: Callable[[Callable, Tensor, Tensor], Tensor]
    items_per_step: int
    unit: str
    lr: float


def gpt_workload(device: torch.device, quick: bool) -> Workload:
    """The issue's GPT-2 small on CUDA (block 1024, 12 layers, 12 heads, 768 wide, GPT-2's vocab
    padded to 50304, batch 16); on the CPU a 4-layer, 128-wide character model (the class's
    vocabulary of 65) that keeps the whole run within a couple of minutes on 2 cores. Dropout 0,
    as in GPT pre-training runs, so the four copies compute the same function."""
    from dlfast.models.gpt import GPT

    if quick:
        config, batch_size = {"vocab_size": 65, "block_size": 32, "n_embd": 64, "n_head": 2, "n_layer": 2}, 4
    elif device.type == "cuda":
        config = {"vocab_size": 50304, "block_size": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
        batch_size = 16
    else:
        config = {"vocab_size": 65, "block_size": 128, "n_embd": 128, "n_head": 4, "n_layer": 4}
        batch_size = 8
    config["dropout"] = 0.0
    T = config["block_size"]

    def batch(device: torch.device, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        tokens = torch.randint(config["vocab_size"], (batch_size, T + 1), generator=gen).to(device)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    return Workload(
        model="gpt",
        config=config,
        batch_size=batch_size,
        build=lambda: GPT(**config),
        batch=batch,
        loss=lambda model, x, y: model(x, y)[1],
        items_per_step=batch_size * T,
        unit="tokens/s",
        lr=6e-4,
    )


def resnet_workload(device: torch.device, quick: bool) -> Workload:
    """The notes' small ResNet on its native 1 x 28 x 28 digits, batch 256 on CUDA, 64 on the CPU."""
    from dlfast.models.cnn import SimpleResNet

    config = {"in_channels": 1, "image_size": 28, "num_classes": 10}
    batch_size = 8 if quick else 256 if device.type == "cuda" else 64

    def batch(device: torch.device, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        size = config["image_size"]
        x = torch.randn(batch_size, config["in_channels"], size, size, generator=gen)
        y = torch.randint(config["num_classes"], (batch_size,), generator=gen)
        return x.to(device), y.to(device)

    return Workload(
        model="resnet",
        config=config,
        batch_size=batch_size,
        build=lambda: SimpleResNet(**config),
        batch=batch,
        loss=lambda model, x, y: F.cross_entropy(model(x), y),
        items_per_step=batch_size,
        unit="images/s",
        lr=1e-3,
    )


WORKLOADS: dict[str, Callable[[torch.device, bool], Workload]] = {
    "gpt": gpt_workload,
    "resnet": resnet_workload,
}


@dataclass
class _Copy:
    """One of the four copies being trained."""

    impl: str
    mode: str
    module: nn.Module  # the model itself (its parameters)
    call: Callable  # module, or torch.compile(module)
    optimizer: torch.optim.Optimizer
    error: str | None = None
    compile_s: float | None = None
    peak_bytes: int | None = None
    times: list[float] | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_backward(work: Workload, c: _Copy, x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    c.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = work.loss(c.call, x, y)
    loss.backward()
    return loss


def _step(work: Workload, c: _Copy, x: Tensor, y: Tensor, dtype: torch.dtype) -> None:
    _forward_backward(work, c, x, y, dtype)
    c.optimizer.step()


def _fail(c: _Copy, exc: Exception, what: str, note: Callable[[str], None]) -> None:
    """Marks the copy failed (it is timed no more) and frees its gradients."""
    c.error = f"{type(exc).__name__}: {exc}"
    c.optimizer.zero_grad(set_to_none=True)
    note(f"{c.impl} {c.mode} {what}: {c.error}")


def _held_bytes(c: _Copy) -> int:
    """Bytes of what the copy holds between steps: its parameters, their gradients (until the next
    step's zero_grad frees them) and its optimizer state."""
    tensors = list(c.module.parameters())
    tensors += [p.grad for p in c.module.parameters() if p.grad is not None]
    for state in c.optimizer.state.values():
        tensors += [t for t in state.values() if isinstance(t, Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Runs fn() once under torch.profiler and returns the most bytes that the tensors it allocated
    held at once: the running sum of the allocations and frees that PyTorch's CPU allocator reports
    with profile_memory=True, in the order they happened. Frees of blocks allocated before fn are
    not reported, so fn should not free what it did not allocate."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _cpu_step_peak_bytes(work: Workload, c: _Copy, x: Tensor, y: Tensor, dtype: torch.dtype) -> int:
    """The copy's peak memory over one training step on the CPU, as if it ran alone.

    torch 2.13 keeps no allocator statistics for the CPU (torch.cpu has no max_memory_allocated),
    and the process's peak resident set size counts the other three copies and the freed memory
    that malloc keeps for reuse (runner.keep_freed_memory), so it cannot tell one copy's step from
    another's. The profiler's memory events can: they are every tensor allocation and free. The
    step runs after the timed rounds, so that the profiler's cost never lands in a timed step.
    Memory PyTorch's allocator does not hand out is not counted: oneDNN's scratchpads and
    primitive caches, scratch buffers of C++ kernels that allocate with new or std::vector,
    Python objects, malloc's slack.
    """
    held = _held_bytes(c)
    # The last step's gradients, freed before the profiler starts: it would not see them go.
    c.optimizer.zero_grad(set_to_none=True)
    without_gradients = _held_bytes(c)
    return max(held, without_gradients + cpu_peak_bytes(lambda: _step(work, c, x, y, dtype)))


def _relative_error(got: list[Tensor | None], want: list[Tensor | None]) -> float:
    if any((g is None) != (w is None) for g, w in zip(got, want, strict=True)):
        return math.inf
    pairs = [(g.float(), w.float()) for g, w in zip(got, want, strict=True) if w is not None]
    diff = math.sqrt(sum((g - w).square().sum().item() for g, w in pairs))
    norm = math.sqrt(sum(w.square().sum().item() for _, w in pairs))
    return diff / max(norm, 1e-30)


@contextlib.contextmanager
def _record_backends(chosen: set[str]) -> Iterator[None]:
    """Collects "op dtype -> backend" for every dlfast op call inside (which kernels the dlfast
    copy actually ran, by the DEFAULTS table, to read its ratio by)."""
    from dlfast import backends

    choose = backends.choose

    def recording(op: str, x: Tensor, backend: str | None = None) -> str:
        name = choose(op, x, backend)
        chosen.add(f"{op} {str(x.dtype).removeprefix('torch.')} -> {name}")
        return name

    backends.choose = recording
    try:
        yield
    finally:
        backends.choose = choose


def _check_step(
    work: Workload, copies: list[_Copy], x: Tensor, y: Tensor, dtype: torch.dtype, note: Callable
) -> None:
    """The first step of every copy, twins first: compiles the compiled ones (timing it) and
    compares each dlfast copy's loss and gradients with its twin's in the same mode."""
    from torch._dynamo.utils import counters

    device = x.device
    reference: dict[str, tuple[float, list[Tensor | None]]] = {}
    chosen: set[str] = set()
    for c in sorted(copies, key=lambda c: c.impl != "twin"):
        if c.error is not None:
            continue
        breaks = sum(counters["graph_break"].values())
        # The same seed before each first step: a model with dropout draws the same masks eagerly.
        torch.manual_seed(1)
        try:
            _sync(device)
            start = time.perf_counter()
            eager_dlfast = c.impl == "dlfast" and c.mode == "eager"
            with _record_backends(chosen) if eager_dlfast else contextlib.nullcontext():
                loss = _forward_backward(work, c, x, y, dtype).item()
            _sync(device)
            if c.mode == "compile":
                c.compile_s = time.perf_counter() - start
            grads = [None if p.grad is None else p.grad.detach().clone() for p in c.module.parameters()]
            c.optimizer.step()
        except Exception as exc:  # a compile failure (no C++ compiler), out of memory, a kernel error
            _fail(c, exc, "failed", note)
            continue
        new_breaks = sum(counters["graph_break"].values()) - breaks
        if new_breaks:
            note(f"{c.impl} compiled with {new_breaks} graph break(s): {dict(counters['graph_break'])}")
        if c.impl == "twin":
            reference[c.mode] = (loss, grads)
            continue
        # A compiled dlfast copy whose twin did not compile is compared with the eager twin.
        want = reference.get(c.mode) or reference.get("eager")
        if want is None:
            c.error = "no twin ran to compare with"
            continue
        loss_error = abs(loss - want[0]) / max(abs(want[0]), 1e-30)
        grad_error = _relative_error(grads, want[1])
        if not (loss_error <= LOSS_TOLERANCE[dtype] and grad_error <= GRAD_TOLERANCE[dtype]):
            c.error = (
                f"wrong: first-step loss {loss!r} vs the twin's {want[0]!r} (relative error "
                f"{loss_error:.2e}), gradients' relative error {grad_error:.2e}"
            )
            note(f"{c.impl} {c.mode}: {c.error}")
    if chosen:
        note("dlfast ops ran on " + ", ".join(sorted(chosen)))


def _time_steps(
    work: Workload,
    copies: list[_Copy],
    x: Tensor,
    y: Tensor,
    dtype: torch.dtype,
    warmup: int,
    rounds: int,
    note: Callable,
) -> None:
    """Warm-up steps, then `rounds` rounds of one timed step per live copy, in turn; each copy's
    peak memory (on the CPU from one more step, after the timed ones)."""
    device = x.device
    live = [c for c in copies if c.error is None]
    if not live:
        return
    for c in live:
        c.times, c.peak_bytes = [], 0
    for round_ in range(warmup + rounds):
        # Each round starts with the next copy, so that none always runs just after another.
        for c in live[round_ % len(live) :] + live[: round_ % len(live)]:
            if c.error is not None:
                continue
            try:
                _sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                start = time.perf_counter()
                _step(work, c, x, y, dtype)
                _sync(device)
                seconds = time.perf_counter() - start
            except Exception as exc:  # e.g. out of memory at a size the first step survived
                _fail(c, exc, "failed while timed", note)
                continue
            if round_ >= warmup:
                c.times.append(seconds)
            if device.type == "cuda":
                step_peak = torch.cuda.max_memory_allocated(device) - base
                c.peak_bytes = max(c.peak_bytes, step_peak)
    for c in live:
        if c.error is not None:
            continue
        if device.type == "cuda":
            # `base` holds the other copies' memory and what this copy holds between steps (its
            # last gradients among it): adding the latter back gives its peak as if it ran alone.
            c.peak_bytes += _held_bytes(c)
            continue
        try:
            c.peak_bytes = _cpu_step_peak_bytes(work, c, x, y, dtype)
        except Exception as exc:  # the profiler unavailable or failing: the times still stand
            c.peak_bytes = None
            note(f"{c.impl} {c.mode}: peak memory not measured: {type(exc).__name__}: {exc}")


def _build_copies(work: Workload, device: torch.device, compile_: bool) -> list[_Copy]:
    """The four copies, from one model's weights, in COPIES order, each with its own AdamW."""
    from dlfast.nn import revert

    torch.manual_seed(0)
    base = work.build().to(device).train()
    copies = []
    for impl, mode in COPIES:
        module = copy.deepcopy(base)
        if impl == "twin":
            revert(module)
        call = torch.compile(module) if mode == "compile" else module
        c = _Copy(impl, mode, module, call, torch.optim.AdamW(module.parameters(), lr=work.lr))
        if mode == "compile" and not compile_:
            c.error = f"skipped: {COMPILE_ENV}=0"
        copies.append(c)
    return copies


def steps_for(device: torch.device, quick: bool) -> tuple[int, int]:
    """(warm-up steps after the first, timed rounds)."""
    if quick:
        return 1, 3
    # A CPU step's time wanders by +-10% from one step to the next on the 2-core machines (a
    # ResNet step of ~110 ms measured 90-130 ms): 30 rounds keep the medians' ratio within a few %.
    return (3, 20) if device.type == "cuda" else (3, 30)


def dtypes_for(device: torch.device, quick: bool) -> tuple[torch.dtype, ...]:
    """bf16 autocast on CUDA. On the CPU fp32, then bf16 autocast too (not with --quick): on a CPU
    with AVX512-BF16 it trains faster, and at the CPU sizes it is where dlfast's C++ kernels are
    the defaults (in fp32 attention delegates to SDPA below 2^20 elements)."""
    if device.type == "cuda":
        return (torch.bfloat16,)
    return (torch.float32,) if quick else (torch.float32, torch.bfloat16)


def bench_model(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    quick: bool,
    compile_: bool,
    note: Callable[[str], None],
) -> tuple[list[dict], int]:
    """Trains the four copies of model `name` in `dtype`; returns its rows and how many dlfast
    copies failed (or were wrong) where their twin in the same mode ran."""
    work = WORKLOADS[name](device, quick)
    torch._dynamo.reset()
    copies = _build_copies(work, device, compile_)
    x, y = work.batch(device, torch.Generator().manual_seed(0))
    _check_step(work, copies, x, y, dtype, note)
    warmup, rounds = steps_for(device, quick)
    _time_steps(work, copies, x, y, dtype, warmup, rounds, note)

    median_ms = {(c.impl, c.mode): 1e3 * statistics.median(c.times) for c in copies if c.error is None}
    twin_eager, twin_compiled = median_ms.get(("twin", "eager")), median_ms.get(("twin", "compile"))
    rows = []
    for c in copies:
        ms = median_ms.get((c.impl, c.mode))
        rows.append(
            {
                "model": name,
                "config": {**work.config, "batch_size": work.batch_size},
                "dtype": str(dtype).removeprefix("torch."),
                "impl": c.impl,
                "mode": c.mode,
                "median_step_ms": ms,
                "throughput": None if ms is None else work.items_per_step / (ms / 1e3),
                "unit": work.unit,
                "peak_mem_mb": None if ms is None or c.peak_bytes is None else c.peak_bytes / 2**20,
                "compile_s": c.compile_s,
                "vs_twin_eager": None if ms is None or twin_eager is None else twin_eager / ms,
                "vs_twin_compiled": None if ms is None or twin_compiled is None else twin_compiled / ms,
                "error": c.error,
            }
        )
    failed = sum(
        1 for c in copies if c.impl == "dlfast" and c.error is not None and ("twin", c.mode) in median_ms
    )
    if ("twin", "eager") not in median_ms:
        failed += 1
    del copies
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, failed


def _cell(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    header = ("model", "dtype", "impl", "mode", "ms/step", "throughput", "peak MB", "compile s")
    header += ("vs twin eager", "vs twin compiled")
    lines = [header]
    for r in rows:
        throughput = "-" if r["throughput"] is None else f"{r['throughput']:,.0f} {r['unit']}"
        lines.append(
            (
                r["model"],
                r["dtype"],
                r["impl"],
                r["mode"],
                _cell(r["median_step_ms"], ".2f"),
                throughput,
                _cell(r["peak_mem_mb"], ",.0f"),
                _cell(r["compile_s"], ".1f"),
                _cell(r["vs_twin_eager"], ".3f", "x"),
                _cell(r["vs_twin_compiled"], ".3f", "x") if r["error"] is None else r["error"][:60],
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    for line in lines:
        # Names left-aligned, numbers right-aligned.
        cells = [
            cell.ljust(w) if j < 4 else cell.rjust(w)
            for j, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        text.append("  ".join(cells).rstrip())
    return "\n".join(text)


def run(args: argparse.Namespace, device: torch.device) -> int:
    """`python -m dlfast bench --model ...`; returns the exit code (1 when a dlfast copy failed
    or was wrong where its twin ran, or the eager twin did not run)."""
    from dlfast.bench.runner import metadata, print_summary, write_json

    names = MODELS if "all" in args.model else tuple(dict.fromkeys(args.model))
    compile_ = os.environ.get(COMPILE_ENV, "1") != "0"
    started = time.perf_counter()
    meta = metadata(device, args.quick)
    meta["timer"] = (
        "time.perf_counter per training step between device synchronisations, median of "
        "interleaved rounds (one step of each copy per round)"
        + (", freed memory kept by malloc" if device.type == "cpu" else "")
    )
    notes: list[str] = []
    rows: list[dict] = []

    def save(complete: bool) -> None:
        if not args.json:
            return
        meta.update(complete=complete, seconds=round(time.perf_counter() - started, 1))
        write_json(args.json, SCHEMA, meta, notes, rows)

    notes.append("bfloat16 rows: torch.autocast(bfloat16) over fp32 weights and fp32 AdamW state")
    if device.type == "cpu":
        notes.append(
            "peak_mem_mb on the CPU: tensors allocated through PyTorch's CPU allocator, from "
            "torch.profiler's memory events over one extra, untimed step per copy"
        )
    if compile_:
        notes.append(
            "compile_s: the compiled twin runs its first step before the compiled dlfast copy, so "
            "kernels common to both are already in inductor's caches when the dlfast copy compiles"
        )
    else:
        notes.append(f"compiled copies skipped ({COMPILE_ENV}=0)")
    failures = 0
    for name, dtype in itertools.product(names, dtypes_for(device, args.quick)):
        where = f"{name} {str(dtype).removeprefix('torch.')}"

        def note(text: str, where: str = where) -> None:
            notes.append(f"{where}: {text}")
            print(f"note: {where}: {text}", file=sys.stderr, flush=True)

        print(f"model {where} ...", file=sys.stderr, flush=True)
        model_rows, failed = bench_model(name, device, dtype, args.quick, compile_, note)
        rows += model_rows
        failures += failed
        save(False)
    meta["seconds"] = round(time.perf_counter() - started, 1)

    print_summary(meta, "training steps; vs twin: > 1 means dlfast is faster", format_table(rows), notes)
    if args.json:
        save(True)
        print(f"wrote {args.json}")
    if failures:
        print(f"error: {failures} copy/copies failed or were wrong; see the notes", file=sys.stderr)
        return 1
    return 0
