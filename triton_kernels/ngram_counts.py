"""N-gram (unigram, bigram, trigram) counting in Triton.

Semantics: ``ngram_counts_`` in csrc/dlfast.cpp. Every token of the flat (rows * L) array is
the first token of one candidate n-gram; a program takes BLOCK consecutive tokens at a time,
loads the n - 1 following tokens with shifted masked loads, and counts the n-gram when all its
tokens lie in [0, V), none is ignore_index and it does not run past its row's end. Each token is
range-checked once, as a first token, and the smallest bad position is kept with one
``tl.atomic_min`` per program.

Two ways of counting:

- Small tables (V^n + 1 <= MAX_HISTOGRAM_BINS): each program is persistent over a strided set of
  tiles and accumulates a private histogram with ``tl.histogram`` (warp ballots and shared
  memory: cost grows with the number of bins, not with how often a bin repeats), then adds its
  non-empty bins into the int64 table once. Frequent n-grams (a space before a common letter)
  would otherwise serialise on a few global addresses.
- Larger tables: one ``tl.atomic_add`` per n-gram straight into the int64 table.

Works on CUDA tensors on a GPU and on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch helpers shared by the ops' wrappers, defined once in layer_norm.py.
from .layer_norm import _device_context, _sm_count

# Largest power-of-two histogram, counting the one bin that collects the n-grams that are not
# counted. tl.histogram does about log2(bins) ballots plus bins / 32 bit tests per element per
# warp, so past about a thousand bins it costs more than the global atomics it saves on data
# without hot bins; the threshold is a first guess to be measured on a GPU.
MAX_HISTOGRAM_BINS = 1024
# Tokens per tile.
_BLOCK = 1024
# A program's private histogram is int32: no program counts more tokens than this.
_MAX_TOKENS_PER_PROGRAM = 1 << 30
# Stand-in for the SM count under the interpreter: small, so that the tests give each
# persistent program several tiles.
_INTERPRETER_PROGRAMS = 3
_NO_BAD_POSITION = 2**63 - 1
_NO_BAD_POSITION_C = tl.constexpr(_NO_BAD_POSITION)  # the same, visible inside kernels

_TOKEN_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


@triton.jit
def _table_size(V, N: tl.constexpr):
    """V ** N for a compile-time N."""
    size = V
    for _ in tl.static_range(1, N):
        size = size * V
    return size


@triton.jit
def _ngram_counts_kernel(
    Tokens,  # (rows * L,) flat token ids, uint8 / int16 / int32 / int64
    Counts,  # (V ** N,) int64 table, added to
    BadPosition,  # () int64: smallest bad position, holds _NO_BAD_POSITION on entry
    total,  # rows * L
    L,  # tokens per row
    V,  # vocab size
    ignore_index,  # compared only when HAS_IGNORE
    tiles_per_program,  # histogram mode: tiles each program visits, num_programs apart
    N: tl.constexpr,  # n-gram length, 1 to 3
    HAS_IGNORE: tl.constexpr,
    HIST_BINS: tl.constexpr,  # power-of-two histogram size, or 0: global atomics per n-gram
    BLOCK: tl.constexpr,  # tokens per tile
):
    pid = tl.program_id(0).to(tl.int64)
    num_programs = tl.num_programs(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    first_bad = tl.full([BLOCK], _NO_BAD_POSITION_C, tl.int64)
    if HIST_BINS > 0:
        hist = tl.zeros([HIST_BINS], dtype=tl.int32)
        n_tiles = tiles_per_program
    else:
        n_tiles = 1
    for i in range(n_tiles):
        # int64 positions: rows * L may pass 2**31 tokens.
        pos = (pid + i * num_programs) * BLOCK + offs
        live = pos < total
        tok = tl.load(Tokens + pos, mask=live, other=0).to(tl.int64)
        in_vocab = (tok >= 0) & (tok < V)
        if HAS_IGNORE:
            ignored = tok == ignore_index
            usable = in_vocab & ~ignored
            bad = live & ~in_vocab & ~ignored
        else:
            usable = in_vocab
            bad = live & ~in_vocab
        first_bad = tl.minimum(first_bad, tl.where(bad, pos, _NO_BAD_POSITION_C))

        # An n-gram starting at or before column L - N ends inside its row, hence inside the
        # array: the shifted loads below need no other bound.
        keep = live & usable & (pos % L <= L - N)
        index = tok
        for k in tl.static_range(1, N):
            nxt = tl.load(Tokens + pos + k, mask=keep, other=0).to(tl.int64)
            usable_k = (nxt >= 0) & (nxt < V)
            if HAS_IGNORE:
                usable_k = usable_k & (nxt != ignore_index)
            keep = keep & usable_k
            index = index * V + nxt

        if HIST_BINS > 0:
            # Not-counted n-grams go to bin V ** N (< HIST_BINS), which is never added to Counts.
            hist += tl.histogram(tl.where(keep, index, _table_size(V, N)).to(tl.int32), HIST_BINS)
        else:
            tl.atomic_add(Counts + index, tl.full([BLOCK], 1, tl.int64), mask=keep)

    if HIST_BINS > 0:
        bins = tl.arange(0, HIST_BINS)
        used = (bins < _table_size(V, N)) & (hist > 0)
        tl.atomic_add(Counts + bins, hist.to(tl.int64), mask=used)
    smallest = tl.min(first_bad, axis=0)
    tl.atomic_min(BadPosition, smallest, mask=smallest < _NO_BAD_POSITION_C)


def _interpreted() -> bool:
    # TRITON_INTERPRET is read when the kernels are decorated (at import), not at call time.
    # Compared by name: importing triton's interpreter module would pull in numpy.
    return type(_ngram_counts_kernel).__name__ == "InterpretedFunction"


def _check_args(counts: torch.Tensor, tokens: torch.Tensor, vocab_size: int, n: int) -> int:
    """Raises on arguments outside the op's contract; returns the table size V ** n."""
    if tokens.device.type != "cuda" and not (tokens.device.type == "cpu" and _interpreted()):
        raise RuntimeError(
            f"dlfast Triton ngram_counts_: tensors on {tokens.device} need a CUDA GPU, or CPU "
            "tensors with TRITON_INTERPRET=1 set before triton is imported"
        )
    if tokens.dtype not in _TOKEN_DTYPES:
        raise TypeError(f"ngram_counts_: tokens must be uint8, int16, int32 or int64, got {tokens.dtype}")
    if tokens.dim() != 2:
        raise ValueError(f"ngram_counts_: tokens must be 2-D (rows, L), got {tuple(tokens.shape)}")
    if not tokens.is_contiguous():
        raise ValueError("ngram_counts_: tokens must be contiguous")
    if n not in (1, 2, 3):
        raise ValueError(f"ngram_counts_: n must be 1, 2 or 3, got {n}")
    if vocab_size < 1:
        raise ValueError(f"ngram_counts_: vocab_size must be >= 1, got {vocab_size}")
    bins = vocab_size**n
    if bins >= 2**63:
        raise ValueError(f"ngram_counts_: vocab_size ** n = {bins} does not fit in int64")
    if counts.device != tokens.device:
        raise ValueError(f"ngram_counts_: counts must be on {tokens.device} like tokens, got {counts.device}")
    if counts.dtype != torch.int64:
        raise TypeError(f"ngram_counts_: counts must be int64, got {counts.dtype}")
    if counts.dim() != 1 or counts.numel() != bins or not counts.is_contiguous():
        raise ValueError(
            f"ngram_counts_: counts must be a contiguous ({bins},) tensor (vocab_size ** n), "
            f"got shape {tuple(counts.shape)}"
        )
    return bins


def ngram_counts_(
    counts: torch.Tensor,
    tokens: torch.Tensor,
    vocab_size: int,
    n: int,
    ignore_index: int | None,
) -> torch.Tensor:
    """Adds the n-gram counts of ``tokens`` into ``counts`` in place.

    tokens: (rows, L) contiguous uint8 / int16 / int32 / int64; n-grams never cross rows.
    counts: (vocab_size ** n,) contiguous int64 on tokens' device; the n-gram (t0, ..., tn-1)
    adds 1 at ((t0 * V + t1) * V + ...) + tn-1. n-grams containing ignore_index or a token
    outside [0, vocab_size) are skipped. Returns a 0-dim int64 tensor on tokens' device: the
    smallest flat position (row * L + col) of a token outside [0, vocab_size) that is not
    ignore_index, or -1. Nothing here waits for the GPU: the caller decides when to look.
    """
    bins = _check_args(counts, tokens, vocab_size, n)
    total = tokens.numel()
    bad = torch.full((), _NO_BAD_POSITION, dtype=torch.int64, device=tokens.device)
    if total == 0:
        return bad.fill_(-1)

    hist_bins = triton.next_power_of_2(bins + 1)
    tiles = triton.cdiv(total, _BLOCK)
    if hist_bins <= MAX_HISTOGRAM_BINS:
        if tokens.device.type == "cuda":
            programs = _sm_count(tokens.device.index) * 4
        else:
            programs = _INTERPRETER_PROGRAMS
        programs = max(min(programs, tiles), triton.cdiv(total, _MAX_TOKENS_PER_PROGRAM))
        tiles_per_program = triton.cdiv(tiles, programs)
    else:
        hist_bins, programs, tiles_per_program = 0, tiles, 1

    with _device_context(tokens):
        _ngram_counts_kernel[(programs,)](
            tokens.view(-1), counts, bad,
            total, tokens.shape[1], vocab_size,
            ignore_index if ignore_index is not None else 0, tiles_per_program,
            N=n, HAS_IGNORE=ignore_index is not None, HIST_BINS=hist_bins, BLOCK=_BLOCK,
            num_warps=4,
        )  # fmt: skip
    return torch.where(bad == _NO_BAD_POSITION, -1, bad)
