"""dlfast.bigram_counts / ngram_counts on every backend against torch.bincount on n-gram ids."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing
from conftest import CPU_ISA_LEVELS, free_port, run_on_cpu_isa, skip_reason

import dlfast

TOKEN_DTYPES = [torch.uint8, torch.int16, torch.int32, torch.int64]


def make_tokens(shape, vocab_size, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, shape, generator=g).to(device=device, dtype=dtype)


def bincount_composite(tokens: torch.Tensor, V: int, n: int, ignore_index=None) -> torch.Tensor:
    """The oracle, independent of dlfast: each row's n-gram ids, then torch.bincount."""
    rows = tokens.reshape(1, -1) if tokens.dim() == 1 else tokens
    ids = []
    for row in rows.long().cpu():
        for i in range(row.numel() - n + 1):
            gram = row[i : i + n].tolist()
            if ignore_index is not None and ignore_index in gram:
                continue
            index = 0
            for t in gram:
                index = index * V + t
            ids.append(index)
    return torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=V**n).view((V,) * n)


@pytest.mark.parametrize("dtype", TOKEN_DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("shape", [(257,), (3, 50), (4, 2)], ids=["stream", "rows", "rows-shorter-than-n"])
def test_matches_bincount(backend_device, dtype, n, shape):
    backend, device = backend_device
    V = 27
    tokens = make_tokens(shape, V, dtype, device)
    counts = dlfast.ngram_counts(tokens, V, n, backend=backend)
    assert counts.dtype == torch.long and counts.shape == (V,) * n and counts.device == tokens.device
    assert torch.equal(counts.cpu(), bincount_composite(tokens, V, n))


@pytest.mark.parametrize("V", [2, 200, 300, 4500], ids=lambda v: f"V{v}")
def test_vocabulary_sizes(backend_device, V):
    """Tiny and large tables: 300^2 and 4500^2 bins are past the CPU kernel's private tables (one
    partition and many of its partitioned count), and 4500^2 past any GPU shared-memory
    histogram."""
    backend, device = backend_device
    tokens = make_tokens((2, 700), V, torch.int32, device)
    assert torch.equal(
        dlfast.bigram_counts(tokens, V, backend=backend).cpu(), bincount_composite(tokens, V, 2)
    )


@pytest.mark.parametrize("V", [10, 400], ids=lambda v: f"V{v}")
def test_ignore_index(backend_device, V):
    backend, device = backend_device
    tokens = make_tokens((3, 40), V, torch.int64, device)
    tokens[:, ::7] = -1  # padding
    tokens[1, 5] = 999  # an id outside the vocabulary, used as padding too
    for pad in (-1, 999):
        masked = tokens.clone()
        masked[masked == (999 if pad == -1 else -1)] = pad
        got = dlfast.bigram_counts(masked, V, ignore_index=pad, backend=backend)
        assert torch.equal(got.cpu(), bincount_composite(masked, V, 2, ignore_index=pad))


def _ngram_bincount(stream: torch.Tensor, V: int, n: int, ignore: int) -> torch.Tensor:
    """bincount_composite of one long stream with ignore_index, vectorised."""
    grams = stream.long().unfold(0, n, 1)  # (L - n + 1, n)
    keep = (grams != ignore).all(1)
    ids = torch.zeros(grams.shape[0], dtype=torch.long)
    for k in range(n):
        ids = ids * V + grams[:, k]
    return torch.bincount(ids[keep], minlength=V**n).view((V,) * n)


@pytest.mark.skipif(skip_reason("cpu", "cpu") is not None, reason=str(skip_reason("cpu", "cpu")))
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(
    "dtype,ignore", [(torch.int32, 0), (torch.int32, 20), (torch.int16, -1), (torch.uint8, -100)], ids=str
)
def test_cpu_fast_path_with_ignore_index(dtype, ignore, n):
    """ignore_index on the CPU's vectorised path: 3 blocks of 2^16 positions, the first with no
    padding, the second with padding throughout and at its last position (an n-gram straddling
    the block boundary), the third with padding in its first n-grams; ignore_index inside the
    vocabulary (0), outside it (20 = V), negative, and one no uint8 token can equal."""
    V = 20
    tokens = make_tokens((3 * 2**16 + 5,), V, torch.int64, "cpu")
    if ignore != -100:
        tokens[2**16 + 3 :: 97] = ignore
        tokens[2**17 - 1] = ignore
        tokens[2**17 : 2**17 + 2] = ignore
    tokens = tokens.to(dtype)
    got = dlfast.ngram_counts(tokens, V, n, ignore_index=ignore, backend="cpu")
    assert torch.equal(got, _ngram_bincount(tokens, V, n, ignore))


def test_out_accumulates_chunks(backend_device):
    backend, device = backend_device
    tokens = make_tokens((1000,), 27, torch.uint8, device)
    out = torch.zeros(27, 27, dtype=torch.long, device=device)
    for chunk in tokens.split(300):
        assert dlfast.bigram_counts(chunk, 27, out=out, backend=backend) is out
    want = sum(bincount_composite(chunk, 27, 2) for chunk in tokens.split(300))
    assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("bad", [27, 200, -3], ids=["V", "far", "negative"])
def test_bad_ids_name_value_and_position_and_leave_out_alone(backend_device, bad):
    backend, device = backend_device
    dtype = torch.uint8 if bad >= 0 else torch.int16
    tokens = make_tokens((2, 30), 27, dtype, device)
    tokens[1, 17] = bad
    tokens[1, 20] = bad
    out = torch.ones(27, 27, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match=rf"token id {bad} at row 1, column 17 is outside \[0, 27\)"):
        dlfast.bigram_counts(tokens, 27, out=out, backend=backend)
    assert torch.equal(out, torch.ones_like(out))
    with pytest.raises(ValueError, match=rf"token id {bad} at position 47 "):
        dlfast.bigram_counts(tokens.view(-1), 27, backend=backend)


@pytest.mark.skipif(skip_reason("cpu", "cpu") is not None, reason="the C++ extension did not load")
@pytest.mark.parametrize("isa", CPU_ISA_LEVELS)
def test_every_cpu_isa_variant(isa):
    """The CPU's vocabulary check and bins are built once per ISA: each build (forced here by
    ATEN_CPU_CAPABILITY) counts every token dtype right, with and without ignore_index, and finds
    a bad id, in the private count (27^2 bins) and the partitioned one (64^3)."""
    run_on_cpu_isa(
        isa,
        "import pytest, torch, dlfast\n"
        "from test_ngram_counts import TOKEN_DTYPES, make_tokens, bincount_composite\n"
        "for dtype in TOKEN_DTYPES:\n"
        "    for V, n in ((27, 2), (64, 3)):\n"
        "        tokens = make_tokens((3, 200), V, dtype, 'cpu')\n"
        "        got = dlfast.ngram_counts(tokens, V, n, backend='cpu')\n"
        "        assert torch.equal(got, bincount_composite(tokens, V, n)), (dtype, V, n)\n"
        "        tokens[:, ::9] = 5\n"
        "        got = dlfast.ngram_counts(tokens, V, n, ignore_index=5, backend='cpu')\n"
        "        assert torch.equal(got, bincount_composite(tokens, V, n, ignore_index=5)), (dtype, V, n)\n"
        "        tokens[2, 150] = V\n"
        "        with pytest.raises(ValueError, match=f'token id {V} at row 2, column 150'):\n"
        "            dlfast.ngram_counts(tokens, V, n, backend='cpu')\n",
    )


@pytest.mark.skipif(skip_reason("cpu", "cpu") is not None, reason="the C++ extension did not load")
def test_cpu_partitioned_count_over_several_batches():
    """A table past the CPU's private tables, counted in batches of 2^24 positions: a stream just
    longer than one batch, with a bad id in the second batch reported at its place."""
    V, n = 300, 2**24 + 1000
    tokens = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(0), dtype=torch.int16)
    want = torch.bincount(tokens[:-1].long() * V + tokens[1:].long(), minlength=V * V).view(V, V)
    assert torch.equal(dlfast.bigram_counts(tokens, V, backend="cpu"), want)
    tokens[2**24 + 10] = V
    with pytest.raises(ValueError, match=rf"token id {V} at position {2**24 + 10} "):
        dlfast.bigram_counts(tokens, V, backend="cpu")


def _bigram_bincount(tokens: torch.Tensor, V: int) -> torch.Tensor:
    """bincount_composite of one stream with n = 2, vectorised for long streams."""
    return torch.bincount(tokens[:-1].long() * V + tokens[1:].long(), minlength=V * V)


def test_the_op_fills_counts_whatever_they_held(backend_device):
    """ngram_counts_ writes every bin rather than adding to it: a table full of garbage comes
    back as the counts. On the CPU this reaches the private tables (V = 11), the partitioned
    count (V = 300) and, at V = 2100 (35 MB of int64), the non-temporal writes of the table, also
    into a table that is not 16-byte aligned (the plain-store fallback)."""
    backend, device = backend_device
    if backend == "reference":
        pytest.skip("the reference backend is plain PyTorch, not a custom op")
    from dlfast.ops.ngram_counts import _KERNELS

    cases = [(11, 500)] + ([(300, 20000), (2100, 20000)] if device == "cpu" and backend == "cpu" else [])
    for V, length in cases:
        tokens = make_tokens((length,), V, torch.int32, device)
        want = _bigram_bincount(tokens.cpu(), V)
        for offset in (0, 1):  # counts at the start of its buffer, and 8 bytes into it
            counts = torch.full((V * V + offset,), 7, dtype=torch.long, device=device)[offset:]
            bad = _KERNELS[backend](counts, tokens.view(1, -1), V, 2, None)
            assert int(bad) == -1
            assert torch.equal(counts.cpu(), want), (V, offset)
    counts = torch.full((121,), 7, dtype=torch.long, device=device)
    _KERNELS[backend](counts, torch.zeros(1, 0, dtype=torch.int32, device=device), 11, 2, None)
    assert not counts.any()


@pytest.mark.skipif(skip_reason("cpu", "cpu") is not None, reason=str(skip_reason("cpu", "cpu")))
def test_cpu_op_refuses_tables_past_2_to_the_32_bins():
    """The CPU kernel computes bins in 32 bits; 2048^3 = 2^33 bins is refused before any count
    (dlfast.ngram_counts itself stops at 2^28 and points to sparse=True)."""
    tokens = torch.zeros(1, 8, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"2048 \*\* 3\) is more than the 2\^32 - 1 bins"):
        torch.ops.dlfast.ngram_counts_(torch.zeros(1, dtype=torch.long), tokens, 2048, 3, None)


def test_a_bad_id_in_no_ngram_is_still_reported(backend_device):
    backend, device = backend_device
    tokens = torch.tensor([[3], [40]], dtype=torch.int32, device=device)  # rows of one token: no pairs
    with pytest.raises(ValueError, match="token id 40 at row 1, column 0"):
        dlfast.bigram_counts(tokens, 27, backend=backend)


def test_argument_errors():
    with pytest.raises(TypeError, match="token ids"):
        dlfast.bigram_counts(torch.rand(10), 27)
    with pytest.raises(TypeError, match="token ids"):
        dlfast.bigram_counts(torch.zeros(10, dtype=torch.int8), 27)
    with pytest.raises(ValueError, match="1-D"):
        dlfast.bigram_counts(torch.zeros(2, 2, 2, dtype=torch.long), 27)
    with pytest.raises(ValueError, match="n must be"):
        dlfast.ngram_counts(torch.zeros(10, dtype=torch.long), 27, 4)
    with pytest.raises(ValueError, match="sparse=True"):
        dlfast.bigram_counts(torch.zeros(10, dtype=torch.long), 50257)
    with pytest.raises(ValueError, match="out must be"):
        dlfast.bigram_counts(torch.zeros(10, dtype=torch.long), 27, out=torch.zeros(27, 27))
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        dlfast.bigram_counts(torch.zeros(10, dtype=torch.long), 27.0)
    with pytest.raises(ValueError, match="do not fit in int64"):
        dlfast.ngram_counts(torch.zeros(10, dtype=torch.long), 2**22, 3, sparse=True)
    with pytest.raises(ValueError, match="ignore_index must be None or an int64 id"):
        dlfast.bigram_counts(torch.zeros(10, dtype=torch.long), 27, ignore_index=2**70)


def test_integer_like_arguments():
    """NumPy integers for vocab_size and ignore_index, as torch takes them for sizes."""
    tokens = torch.tensor([1, 2, 0, 1, 2])
    want = dlfast.bigram_counts(tokens, 3, ignore_index=0)
    torch.testing.assert_close(dlfast.bigram_counts(tokens, np.int64(3), ignore_index=np.int32(0)), want)


def test_empty_input(backend_device):
    backend, device = backend_device
    for tokens in (torch.zeros(0, dtype=torch.long), torch.zeros(3, 0, dtype=torch.long)):
        counts = dlfast.bigram_counts(tokens.to(device), 27, backend=backend)
        assert torch.equal(counts.cpu(), torch.zeros(27, 27, dtype=torch.long))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sparse_matches_dense(n):
    tokens = make_tokens((3, 200), 30, torch.int32, "cpu")
    sparse = dlfast.ngram_counts(tokens, 30, n, sparse=True)
    assert sparse.is_sparse and sparse.is_coalesced()
    assert torch.equal(sparse.to_dense(), bincount_composite(tokens, 30, n))


def test_sparse_with_a_bpe_sized_vocabulary():
    V = 50257
    tokens = make_tokens((5000,), V, torch.int64, "cpu")
    tokens[100:110] = torch.tensor([7, 9] * 5)  # a repeated pair
    sparse = dlfast.bigram_counts(tokens, V, sparse=True)
    assert sparse.shape == (V, V)
    ids = (tokens[:-1] * V + tokens[1:]).tolist()
    assert sparse._values().sum().item() == len(ids) and sparse._nnz() == len(set(ids))
    assert sparse[7, 9].item() == ids.count(7 * V + 9) >= 5
    with pytest.raises(ValueError, match="outside"):
        dlfast.bigram_counts(torch.tensor([1, V]), V, sparse=True)


def test_opcheck(backend_device):
    backend, device = backend_device
    if backend == "reference":
        pytest.skip("the reference backend is plain PyTorch, not a custom op")
    from dlfast.ops.ngram_counts import _KERNELS

    tokens = make_tokens((2, 33), 11, torch.int32, device)
    counts = torch.zeros(121, dtype=torch.long, device=device)
    torch.library.opcheck(_KERNELS[backend], (counts, tokens, 11, 2, None))
    torch.library.opcheck(_KERNELS[backend], (counts, tokens, 11, 2, 3))


def _count_shard(rank: int, world: int, port: int, tokens: torch.Tensor, results) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        shard = tokens.chunk(world)[rank]
        results[rank] = dlfast.bigram_counts_distributed(shard, 27, backend="reference")
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_counts_sum_over_two_gloo_processes():
    tokens = make_tokens((4, 64), 27, torch.int32, "cpu")  # 4 rows: each process gets 2
    manager = torch.multiprocessing.get_context("spawn").Manager()
    results = manager.dict()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.multiprocessing.spawn(_count_shard, args=(2, free_port(), tokens, results), nprocs=2, join=True)
    want = bincount_composite(tokens, 27, 2)
    assert torch.equal(results[0], want) and torch.equal(results[1], want)
