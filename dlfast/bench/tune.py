"""Tile sweep of the Triton attention kernels on a GPU: `python -m dlfast.bench.tune`.

triton_kernels/attention.py takes each kernel's tiles (BLOCK_M, BLOCK_N, num_warps, num_stages)
from its _CONFIGS table, by kernel (fwd, dkdv, dq), float32 or not, and head-dim bucket
(BLOCK_D <= 64, 128, 256). The table was chosen from ptxas register counts with no GPU to time
on. This sweep times candidate tiles on the GPU at hand at the benchmark's sizes (16k tokens,
hidden 2048, one sequence length, causal and not), one kernel at a time with every other kernel
on its table entry. The backward's kernels run one after another, so its time is their sum and
each kernel is tuned on its own. A candidate that does not compile (registers, shared memory)
or whose result differs from the table entry's by more than the benchmark's tolerance is
reported and never chosen.

The JSON (schema dlfast-tune/1) has every timing and, per entry, the candidate with the least
time summed over causal and not. The table is edited by hand from it, keeping an entry whose
rival wins by less than the run-to-run noise.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator

import torch

from dlfast.bench.attention import GPU_HIDDEN, GPU_TOKENS, TOLERANCE
from dlfast.bench.runner import Timed, metadata, time_calls, write_json

KERNELS = ("fwd", "dkdv", "dq")
Config = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)


def candidates(kernel: str, fp32: bool) -> list[Config]:
    """The tiles tried for `kernel`: the forward and dq kernels own a query tile (BLOCK_M) and
    stream key tiles (BLOCK_N); the dk/dv kernel owns a key tile (BLOCK_N) and streams query
    tiles. float32 runs its dots on FMA units with the operands in registers: smaller tiles."""
    if fp32:
        owned, streamed, stages = (32, 64), (16, 32), (1, 2)
    elif kernel == "fwd":
        owned, streamed, stages = (64, 128), (32, 64, 128), (2, 3)
    else:
        owned, streamed, stages = (64, 128), (16, 32, 64), (2, 3)
    pairs = [(o, s) for o in owned for s in streamed if s <= o]
    if kernel == "dkdv":
        pairs = [(s, o) for o, s in pairs]
    return [(m, n, w, st) for (m, n), w, st in itertools.product(pairs, (4, 8), stages)]


@contextlib.contextmanager
def table_entry(kernel: str, fp32: bool, bucket: int, config: Config) -> Iterator[None]:
    """Sets one entry of the attention kernels' _CONFIGS for the duration of the block."""
    from dlfast.triton_kernels import attention

    key = (kernel, fp32)
    saved = attention._CONFIGS[key]
    attention._CONFIGS[key] = saved[:bucket] + (config,) + saved[bucket + 1 :]
    try:
        yield
    finally:
        attention._CONFIGS[key] = saved


def _bucket(D: int) -> int:
    return 0 if D <= 64 else 1 if D <= 128 else 2


def _relative_error(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> float:
    """The largest over the outputs of |got - want| / |want| (2-norms, in float32)."""
    errors = [
        (g.float() - w.float()).norm().item() / max(w.float().norm().item(), 1e-30)
        for g, w in zip(got, want, strict=True)
    ]
    return max(errors)


def _workload(kernel: str, q, k, v, dout, causal: bool) -> Callable[[], tuple[torch.Tensor, ...]]:
    """The call that runs `kernel`: the forward, or the backward (its delta, dk/dv and dq kernels)
    from a forward run once with the table's tiles."""
    from dlfast.triton_kernels.attention import attention_bwd, attention_fwd

    scale = q.shape[-1] ** -0.5
    if kernel == "fwd":
        return lambda: attention_fwd(q, k, v, None, causal, 0, scale, 0.0, None)[:1]
    out, lse = attention_fwd(q, k, v, None, causal, 0, scale, 0.0, None)
    return lambda: attention_bwd(dout, q, k, v, out, lse, None, causal, 0, scale, 0.0, None, False)


def tune_entry(
    kernel: str,
    D: int,
    dtype: torch.dtype,
    device: torch.device,
    L: int,
    tokens: int,
    hidden: int,
    configs: list[Config],
    quick: bool = False,
) -> list[dict]:
    """One row per tile of `kernel` at head dim D, the table entry's first: its milliseconds
    causal and not (or the error that stopped it) and its largest relative error against the
    table entry's result."""
    from dlfast.triton_kernels.attention import _CONFIGS

    fp32, bucket = dtype == torch.float32, _bucket(D)
    table = _CONFIGS[kernel, fp32][bucket]
    B, H = max(1, tokens // L), max(1, hidden // D)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=gen) for _ in range(4))
    want = {causal: _workload(kernel, q, k, v, dout, causal)() for causal in (False, True)}
    rows = []
    for config in [table] + [c for c in configs if c != table]:
        row = {"kernel": kernel, "dtype": str(dtype).removeprefix("torch."), "D": D, "B": B, "H": H, "L": L}
        row.update(config=list(config), table=list(table))
        try:
            with table_entry(kernel, fp32, bucket, config):
                for causal in (False, True):
                    run = _workload(kernel, q, k, v, dout, causal)
                    err = _relative_error(run(), want[causal])
                    row["relative_error"] = max(row.get("relative_error", 0.0), err)
                    ms = time_calls({"run": Timed(run)}, device, quick)["run"]
                    row["causal_ms" if causal else "ms"] = ms
            if row["relative_error"] > TOLERANCE[dtype]:
                row["error"] = f"differs from the table entry's result by {row['relative_error']:.2e}"
        except Exception as exc:  # a tile that does not compile: reported, never chosen
            row["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        rows.append(row)
        print(f"  {kernel} D={D} {tuple(config)}: {row.get('error') or _timing(row)}", flush=True)
    return rows


def best(rows: list[dict]) -> dict | None:
    """The candidate with the least time summed over causal and not, among those that ran and
    matched the table entry's result."""
    ok = [r for r in rows if "error" not in r]
    return min(ok, key=lambda r: r["ms"] + r["causal_ms"], default=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlfast.bench.tune", description=__doc__.split("\n")[0])
    parser.add_argument("--kernel", action="append", choices=KERNELS, help="repeatable (default: all)")
    parser.add_argument("--head-dim", action="append", type=int, help="repeatable (default: 64, 128)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--seq", type=int, default=4096, help="sequence length (default 4096)")
    parser.add_argument("--json", help="write every row and the best tiles here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the sweep times the kernels on a CUDA GPU; none is visible")
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    meta = metadata(device, quick=False)
    rows, chosen = [], []
    for kernel in args.kernel or KERNELS:
        for D in args.head_dim or (64, 128):
            entry = tune_entry(
                kernel, D, dtype, device, args.seq, GPU_TOKENS, GPU_HIDDEN,
                candidates(kernel, dtype == torch.float32),
            )  # fmt: skip
            rows += entry
            top, table_row = best(entry), entry[0]
            if top is not None:
                chosen.append({"kernel": kernel, "D": D, "best": top["config"], "table": table_row["config"]})
            print(_line(kernel, D, top, table_row), flush=True)
            if args.json:  # after every entry: a run cut short keeps what it measured
                meta["seconds"] = round(time.perf_counter() - started, 1)
                write_json(args.json, "dlfast-tune/1", meta, [f"best: {c}" for c in chosen], rows)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _timing(row: dict) -> str:
    return f"{tuple(row['config'])} {row['ms']:.3f} + {row['causal_ms']:.3f} ms (not causal + causal)"


def _line(kernel: str, D: int, top: dict | None, table_row: dict) -> str:
    if top is None:
        return f"{kernel} D={D}: no candidate ran"
    text = f"{kernel} D={D}: best {_timing(top)}; table "
    if "error" in table_row:
        return text + f"{tuple(table_row['config'])}: {table_row['error']}"
    return text + _timing(table_row)


if __name__ == "__main__":
    raise SystemExit(main())
