"""dlfast.bigram_counts and dlfast.ngram_counts: count adjacent token pairs (and n-grams).

Every kernel backend implements one op, with the schema of csrc/dlfast.cpp:

  ngram_counts_(counts, tokens, vocab_size, n, ignore_index?) -> first bad position

which fills a flat int64 table (whatever it held before) and reports (never indexes with)
out-of-range tokens. The cpu and cuda backends are torch.ops.dlfast.ngram_counts_ (C++); the
triton backend is torch.ops.dlfast.ngram_counts_triton_, defined here; the reference and torch
backends count with torch.bincount on pair indices (dlfast.reference.ngram_counts), the
composite the kernels replace. Large vocabularies take a sparse sort-and-count path instead of a dense table.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from dlfast import backends, reference

TOKEN_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)

# The largest dense table built (2 GiB of int64 bins); past it sparse=True is the way.
MAX_DENSE_BINS = 2**28


def _position_fake(
    counts: Tensor, tokens: Tensor, vocab_size: int, n: int, ignore_index: int | None
) -> Tensor:
    return tokens.new_empty((), dtype=torch.long)


@torch.library.custom_op("dlfast::ngram_counts_triton_", mutates_args=("counts",))
def _ngram_counts_triton_(
    counts: Tensor, tokens: Tensor, vocab_size: int, n: int, ignore_index: int | None
) -> Tensor:
    from dlfast.triton_kernels.ngram_counts import ngram_counts_

    counts.zero_()  # the op fills counts; the launcher adds into it
    return ngram_counts_(counts, tokens, vocab_size, n, ignore_index)


torch.library.register_fake("dlfast::ngram_counts_triton_")(_position_fake)
_KERNELS = {"triton": torch.ops.dlfast.ngram_counts_triton_.default}
if backends.EXTENSION_ERROR is None:
    torch.library.register_fake("dlfast::ngram_counts_")(_position_fake)
    _KERNELS["cpu"] = _KERNELS["cuda"] = torch.ops.dlfast.ngram_counts_.default


_INT64_MAX = 2**63 - 1


def _check(
    tokens: Tensor, vocab_size: int, n: int, ignore_index: int | None, op: str
) -> tuple[Tensor, int, int | None]:
    """Checks the arguments; returns tokens as contiguous (rows, L), and vocab_size and
    ignore_index as ints (NumPy integers are taken, as torch takes them)."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{op}: tokens must be a Tensor, got {type(tokens).__name__}")
    if tokens.dtype not in TOKEN_DTYPES:
        raise TypeError(f"{op}: tokens must be uint8, int16, int32 or int64 token ids, got {tokens.dtype}")
    dim = tokens.dim()
    if dim not in (1, 2):
        raise ValueError(
            f"{op}: tokens must be 1-D (one stream) or 2-D (rows), got shape {tuple(tokens.shape)}"
        )
    V = _as_int(vocab_size)
    if V is None or V < 1:
        raise ValueError(f"{op}: vocab_size must be a positive int, got {vocab_size!r}")
    if n not in (1, 2, 3):
        raise ValueError(f"{op}: n must be 1, 2 or 3, got {n!r}")
    # Every n-gram is one int64 id, ((t0 V + t1) V + ...) + tn-1, in every path.
    if V**n > _INT64_MAX:
        raise ValueError(f"{op}: vocab_size ** n = {V}**{n} n-gram ids do not fit in int64")
    if ignore_index is not None:
        index = _as_int(ignore_index)
        if index is None or not -_INT64_MAX - 1 <= index <= _INT64_MAX:
            raise ValueError(f"{op}: ignore_index must be None or an int64 id, got {ignore_index!r}")
        ignore_index = index
    return (tokens.unsqueeze(0) if dim == 1 else tokens).contiguous(), V, ignore_index


def _as_int(value) -> int | None:
    """value as an int if it is integer-like (not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _raise_bad_token(tokens: Tensor, rows: Tensor, position: int, vocab_size: int, op: str) -> None:
    value = int(rows.view(-1)[position])
    where = (
        f"position {position}"
        if tokens.dim() == 1
        else f"row {position // rows.shape[1]}, column {position % rows.shape[1]}"
    )
    raise ValueError(
        f"{op}: token id {value} at {where} is outside [0, {vocab_size}) (vocab_size={vocab_size})"
    )


def ngram_counts(
    tokens: Tensor,
    vocab_size: int,
    n: int,
    *,
    out: Tensor | None = None,
    ignore_index: int | None = None,
    sparse: bool = False,
    backend: str | None = None,
) -> Tensor:
    """How often each n-gram of adjacent tokens occurs: a (vocab_size,) * n int64 table.

    Args:
        tokens: uint8/int16/int32/int64 token ids, 1-D (one stream) or 2-D (a batch of rows;
            n-grams never cross rows).
        vocab_size: V; every id must lie in [0, V) (or equal ignore_index).
        n: 1 (unigram), 2 (bigram: table[a, b] counts b directly after a) or 3 (trigram).
        out: a dense (V,) * n int64 table on tokens' device to add the counts into (to stream a
            corpus in chunks); it is returned. Unchanged if the call raises.
        ignore_index: an id (padding) whose n-grams are skipped.
        sparse: return a coalesced sparse COO tensor of the observed n-grams, built by sorting
            and counting, for vocabularies whose dense table would be too large (V ** n above
            2^28 bins: a 50257-token BPE vocabulary's bigrams, say).
        backend: force one of dlfast.available_backends(); default from dlfast.backends.DEFAULTS.

    Raises:
        TypeError for non-integer tokens; ValueError naming the first out-of-range id and its
        position (the kernels never index with it; on the GPU this waits for the kernel).
    """
    op = "ngram_counts"
    rows, vocab_size, ignore_index = _check(tokens, vocab_size, n, ignore_index, op)
    if sparse:
        if out is not None:
            raise ValueError(f"{op}: out= adds into a dense table; with sparse=True add the returned tensors")
        return _sparse_counts(tokens, rows, vocab_size, n, ignore_index, op)
    bins = vocab_size**n
    if bins > MAX_DENSE_BINS:
        raise ValueError(
            f"{op}: a dense table of vocab_size ** n = {bins} bins is too large (limit {MAX_DENSE_BINS}); "
            "pass sparse=True for a sparse tensor of the observed n-grams"
        )
    if out is not None:
        if not isinstance(out, Tensor) or out.dtype != torch.long or tuple(out.shape) != (vocab_size,) * n:
            raise ValueError(f"{op}: out must be an int64 tensor of shape {(vocab_size,) * n}")
        if out.device != tokens.device:
            raise ValueError(f"{op}: out is on {out.device} but tokens is on {tokens.device}")
    name = backends.choose("ngram_counts", rows, backend)
    if name in ("reference", "torch"):
        counts, bad = reference.ngram_counts(rows, vocab_size, n, ignore_index)
    else:
        counts = rows.new_empty(bins, dtype=torch.long)
        bad = int(_KERNELS[name](counts, rows, vocab_size, n, ignore_index))
    if bad >= 0:
        _raise_bad_token(tokens, rows, bad, vocab_size, op)
    table = counts.view((vocab_size,) * n)
    if out is None:
        return table
    # Counted into a fresh table first, so that out is untouched when a bad id raises.
    return out.add_(table)


def bigram_counts(
    tokens: Tensor,
    vocab_size: int,
    *,
    out: Tensor | None = None,
    ignore_index: int | None = None,
    sparse: bool = False,
    backend: str | None = None,
) -> Tensor:
    """(vocab_size, vocab_size) int64 table whose [a, b] counts how often b directly follows a.

    ngram_counts with n = 2: see there for tokens, out, ignore_index, sparse and the errors.
    """
    return ngram_counts(
        tokens, vocab_size, 2, out=out, ignore_index=ignore_index, sparse=sparse, backend=backend
    )


def bigram_counts_distributed(
    tokens_shard: Tensor,
    vocab_size: int,
    group=None,
    *,
    ignore_index: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """bigram_counts of this process's shard, summed over the processes of `group` (default:
    the whole world) with torch.distributed.all_reduce: every process gets the corpus's table.

    Each shard counts as its own row(s): a pair straddling two shards is not counted, so cut
    shards at sequence boundaries (or on padding).
    """
    counts = bigram_counts(tokens_shard, vocab_size, ignore_index=ignore_index, backend=backend)
    torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM, group=group)
    return counts


def _sparse_counts(tokens: Tensor, rows: Tensor, V: int, n: int, ignore_index: int | None, op: str) -> Tensor:
    """The sort-and-count path: one int64 id per usable n-gram, sorted and run-length counted
    by torch.unique, turned into coalesced COO indices."""
    ids, bad = reference.ngram_ids(rows, V, n, ignore_index)
    if bool(bad.any()):
        _raise_bad_token(tokens, rows, int(bad.view(-1).nonzero()[0, 0]), V, op)
    unique, counts = torch.unique(ids, sorted=True, return_counts=True)
    coords = torch.stack([(unique // V ** (n - 1 - k)) % V for k in range(n)])
    # The indices come sorted and unique from torch.unique: valid by construction.
    return torch.sparse_coo_tensor(coords, counts, (V,) * n, is_coalesced=True, check_invariants=False)
