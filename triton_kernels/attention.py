"""Fused attention, FlashAttention-2 style, in Triton: the (Lq, Lk) score matrix is never stored.

Semantics are those of the `attention_fwd` / `attention_bwd` schemas in csrc/dlfast.cpp and of
dlfast.reference.attention: q (B, H, Lq, D), k and v (B, Hkv, Lk, D) with Hkv dividing H (query
head h reads key/value head h // (H // Hkv)); query i may attend key j iff key_padding_mask[b, j]
and, when causal, j <= i + causal_shift; dropout keeps a probability iff word 0 of
Philox4x32-10(key = seed, counter = (j, i, b * H + h, 0)) >= floor(p * 2^32).

Forward: one program per (query block, batch * head). It walks the key blocks with an online
softmax in base 2 (the scale is folded with log2(e) into one multiply), stops at the last key
block the causal diagonal reaches, and applies the causal mask only to the blocks the diagonal
crosses. It stores the output and the natural-log log-sum-exp (+inf for a row with no allowed
key, whose output is zeros).

Backward: a preprocess computes delta_i = rowsum(dout * out) (which equals rowsum(P * dP) with
dropout too). Then dk/dv come from one program per (key block, batch, kv head) that walks the
query heads of its group and their query blocks in a fixed order, and dq from one program per
(query block, batch * head) that walks the key blocks. Nothing is accumulated with atomics, so
the backward is bitwise deterministic on every run and `deterministic` needs no special path.

Head dims 16..256 of any value are padded to the next power of two with masked loads. float32
dots use input_precision="ieee" (tf32 would miss float32 tolerances); float16 and bfloat16 dots
take 16-bit operands and accumulate in float32.

Works on CUDA tensors on a GPU and on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

_LOG2E = math.log2(math.e)
_LN2_C = tl.constexpr(math.log(2.0))
_LOG2E_C = tl.constexpr(_LOG2E)
# Philox4x32 multipliers and Weyl key increments (Random123's constants).
_PHILOX_M0 = tl.constexpr(0xD2511F53)
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(
    base,  # (n_rows, D) contiguous rows of one head
    rows,  # (R,) int32 row indices, may run past n_rows
    cols,  # (BLOCK_D,) int32 column indices
    n_rows,
    D,
    EVEN_D: tl.constexpr,  # D == BLOCK_D: no column mask
):
    """(R, BLOCK_D) tile of rows; rows past n_rows and columns past D read as 0."""
    ptrs = base + rows[:, None] * D + cols[None, :]
    if EVEN_D:
        tile = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < D)[None, :], other=0.0)
    return tile


@triton.jit
def _store_rows(base, tile, rows, cols, n_rows, D, EVEN_D: tl.constexpr):
    """Stores the (R, BLOCK_D) tile into rows < n_rows, columns < D, in base's dtype."""
    ptrs = base + rows[:, None] * D + cols[None, :]
    if EVEN_D:
        tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows < n_rows)[:, None])
    else:
        tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows < n_rows)[:, None] & (cols < D)[None, :])


@triton.jit
def _philox_key(Seed, DROPOUT: tl.constexpr):
    """The two 32-bit Philox key words of the 0-dim int64 seed (low word first); read from
    memory so that a captured CUDA graph sees each replay's seed. Zeros without dropout."""
    k0 = 0
    k1 = 0
    if DROPOUT:
        seed = tl.load(Seed).to(tl.uint64, bitcast=True)
        k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
        k1 = (seed >> 32).to(tl.uint32)
    return k0, k1


@triton.jit
def _dropout_keep(
    rows,  # query indices i, int32, broadcastable against cols
    cols,  # key indices j, int32
    drop,  # (bh = b * H + h, k0, k1, threshold, scale): the dropout stream of one query head
):
    """Bool tile: which probabilities survive dropout, (i, j) kept iff word 0 of Philox4x32-10
    with counter (j, i, bh, 0) and key (k0, k1) is >= threshold."""
    bh, k0, k1, threshold, _ = drop
    rows, cols = tl.broadcast(rows, cols)
    c0 = cols.to(tl.uint32, bitcast=True)
    c1 = rows.to(tl.uint32, bitcast=True)
    c2 = tl.zeros_like(c0) + bh.to(tl.uint32)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _PHILOX_M0)
        lo0 = c0 * _PHILOX_M0
        hi1 = tl.umulhi(c2, _PHILOX_M1)
        lo1 = c2 * _PHILOX_M1
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + _PHILOX_W0
        k1 = k1 + _PHILOX_W1
    # threshold may be up to 2^32 - 1 (an int64 argument): compare in int64.
    return c0.to(tl.int64) >= threshold


@triton.jit
def _mask_scores(
    s,  # scores tile, rows = queries, cols = keys (either orientation)
    rows,  # query indices, broadcastable against s
    cols,  # key indices, broadcastable against s
    Mask_b,  # (Lk,) uint8 padding-mask row of this batch; read only if HAS_PAD
    Lk,
    causal_shift,
    MASK_CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    KEY_TAIL: tl.constexpr,  # keys may run past Lk (masked even without padding mask)
):
    """s with -inf where the query may not attend the key."""
    if MASK_CAUSAL:
        s = tl.where(cols <= rows + causal_shift, s, float("-inf"))
    if HAS_PAD:
        allowed = tl.load(Mask_b + cols, mask=cols < Lk, other=0) != 0
        s = tl.where(allowed, s, float("-inf"))
    elif KEY_TAIL:
        s = tl.where(cols < Lk, s, float("-inf"))
    return s


@triton.jit
def _query_program(
    Q,  # (B, H, Lq, D)
    K,  # (B, HKV, Lk, D)
    V,  # (B, HKV, Lk, D)
    Mask,  # (B, Lk) uint8; read only if HAS_PAD (by the callers)
    Seed,  # 0-dim int64; read only if DROPOUT
    H,
    HKV,
    Lq,
    Lk,
    D,
    causal_shift,
    qk_scale,  # scale * log2(e)
    drop_threshold,
    drop_scale,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Set-up of a program that owns one query block of one head (forward and dq), grid
    (query block, batch * head). Returns (bh, rows, q, keys, drop, full_end, end): keys =
    (K_head, V_head, Mask_b, Lk, D, causal_shift, qk_scale) describes the key side, drop the
    dropout stream; key blocks [0, full_end) need no causal mask, [full_end, end) cross the
    diagonal, and keys from end on are beyond it for every row of the block."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    kv_bh = b * HKV + (bh % H) // (H // HKV)
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + bh * Lq * D, rows, tl.arange(0, BLOCK_D), Lq, D, EVEN_D)
    keys = (K + kv_bh * Lk * D, V + kv_bh * Lk * D, Mask + b * Lk, Lk, D, causal_shift, qk_scale)
    k0, k1 = _philox_key(Seed, DROPOUT)
    drop = (bh, k0, k1, drop_threshold, drop_scale)
    end = Lk
    full_end = Lk
    if CAUSAL:
        last_row = tl.minimum(start_m + BLOCK_M, Lq) - 1
        end = tl.minimum(Lk, tl.maximum(last_row + causal_shift + 1, 0))
        full_end = tl.minimum(end, tl.maximum(start_m + causal_shift + 1, 0) // BLOCK_N * BLOCK_N)
    return bh, rows, q, keys, drop, full_end, end


@triton.jit
def _score_block(
    q,  # (BLOCK_M, BLOCK_D) query tile
    rows,  # (BLOCK_M,) query indices
    start_n,
    keys,  # from _query_program
    MASK_CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    KEY_TAIL: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(cols, k, v, s) of the key block at start_n: its indices, keys and values, and the
    query tile's scores against it in base 2 (scale * log2(e) folded in), -inf where not
    allowed."""
    K_head, V_head, Mask_b, Lk, D, causal_shift, qk_scale = keys
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K_head, cols, offs_d, Lk, D, EVEN_D)
    v = _load_rows(V_head, cols, offs_d, Lk, D, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = _mask_scores(
        s, rows[:, None], cols[None, :], Mask_b, Lk, causal_shift, MASK_CAUSAL, HAS_PAD, KEY_TAIL
    )
    return cols, k, v, s


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_blocks(
    acc,  # (BLOCK_M, BLOCK_D) fp32 running sum of kept p @ v
    m_i,  # (BLOCK_M,) fp32 running row max of the base-2 scores, -inf while none allowed
    l_i,  # (BLOCK_M,) fp32 running sum of exp2(score - m_i), before dropout
    q,
    rows,
    lo,  # first key block start (a multiple of BLOCK_N)
    hi,  # keys end
    keys,
    drop,
    MASK_CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    KEY_TAIL: tl.constexpr,
    DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Online softmax over the key blocks in [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols, k, v, s = _score_block(
            q, rows, start_n, keys, MASK_CAUSAL, HAS_PAD, KEY_TAIL, EVEN_D, DOT_PRECISION, BLOCK_N, BLOCK_D
        )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing allowed yet keeps m = -inf; subtracting 0 instead keeps its p and
        # alpha at exactly 0 (rather than exp2(-inf - -inf) = NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            # The normaliser l_i sums every probability; only the kept ones reach the output.
            p = tl.where(_dropout_keep(rows[:, None], cols[None, :], drop), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, H, Lq, D) contiguous
    K,  # (B, HKV, Lk, D) contiguous
    V,  # (B, HKV, Lk, D) contiguous
    Mask,  # (B, Lk) uint8, nonzero = attend; read only if HAS_PAD
    Seed,  # 0-dim int64 dropout seed; read only if DROPOUT
    Out,  # (B, H, Lq, D) out, q.dtype
    Lse,  # (B, H, Lq) fp32 out: natural-log log-sum-exp, +inf for a row with no allowed key
    H,
    HKV,
    Lq,
    Lk,
    D,
    causal_shift,
    qk_scale,  # scale * log2(e)
    drop_threshold,  # floor(p * 2^32) clamped to 2^32 - 1
    drop_scale,  # 1 / (1 - p), or 1
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    KEY_TAIL: tl.constexpr,  # Lk % BLOCK_N != 0
    DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr,  # D == BLOCK_D
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next_power_of_2(D)
):
    bh, rows, q, keys, drop, full_end, end = _query_program(
        Q, K, V, Mask, Seed, H, HKV, Lq, Lk, D, causal_shift, qk_scale, drop_threshold, drop_scale,
        CAUSAL, DROPOUT, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _fwd_blocks(
        acc, m_i, l_i, q, rows, 0, full_end, keys, drop,
        False, HAS_PAD, KEY_TAIL, DROPOUT, EVEN_D, DOT_PRECISION, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    if CAUSAL:
        acc, m_i, l_i = _fwd_blocks(
            acc, m_i, l_i, q, rows, full_end, end, keys, drop,
            True, HAS_PAD, KEY_TAIL, DROPOUT, EVEN_D, DOT_PRECISION, BLOCK_N, BLOCK_D,
        )  # fmt: skip

    # l_i >= 1 once any key is allowed (the row max contributes exp2(0)); 0 means none was.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (drop_scale / l_safe)[:, None]
    lse = tl.where(empty, float("inf"), m_i * _LN2_C + tl.log(l_safe))
    _store_rows(Out + bh * Lq * D, out, rows, tl.arange(0, BLOCK_D), Lq, D, EVEN_D)
    tl.store(Lse + bh * Lq + rows, lse, mask=rows < Lq)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta_kernel(
    Out,  # (B * H, Lq, D) forward output
    DOut,  # (B * H, Lq, D) upstream gradient
    Delta,  # (B * H, Lq) fp32 out: rowsum(dout * out)
    Lq,
    D,
    EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + bh * Lq * D, rows, offs_d, Lq, D, EVEN_D).to(tl.float32)
    do = _load_rows(DOut + bh * Lq * D, rows, offs_d, Lq, D, EVEN_D).to(tl.float32)
    tl.store(Delta + bh * Lq + rows, tl.sum(o * do, axis=1), mask=rows < Lq)


@triton.jit
def _dkdv_blocks(
    dk,  # (BLOCK_N, BLOCK_D) fp32 running dk / scale
    dv,  # (BLOCK_N, BLOCK_D) fp32 running dv
    k,  # (BLOCK_N, BLOCK_D) key tile
    v,  # (BLOCK_N, BLOCK_D) value tile
    cols,  # (BLOCK_N,) key indices of the tile
    lo,  # first query block start (a multiple of BLOCK_M)
    hi,  # queries end
    queries,  # (Q_head, DO_head, Lse_head, Delta_head, Lq, D, causal_shift, qk_scale) of one head
    drop,  # dropout stream of that head
    MASK_CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Adds the query blocks in [lo, hi) of one query head into dk / scale and dv."""
    Q_head, DO_head, Lse_head, Delta_head, Lq, D, causal_shift, qk_scale = queries
    _, _, _, _, drop_scale = drop
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        # Transposed orientation, keys along rows: every dot accumulates into (BLOCK_N, D).
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q_head, rows, offs_d, Lq, D, EVEN_D)
        do = _load_rows(DO_head, rows, offs_d, Lq, D, EVEN_D)
        # Past-the-end query rows get lse = +inf, so their probabilities are exactly 0.
        lse2 = tl.load(Lse_head + rows, mask=rows < Lq, other=float("inf")) * _LOG2E_C
        delta = tl.load(Delta_head + rows, mask=rows < Lq, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        # The padding mask is applied to whole rows of dk, dv by the caller; past-the-end keys
        # are never stored, and rows do not mix in these dots.
        s_t = _mask_scores(
            s_t, rows[None, :], cols[:, None], Lse_head, 0, causal_shift, MASK_CAUSAL, False, False
        )
        p_t = tl.exp2(s_t - lse2[None, :])
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(rows[None, :], cols[:, None], drop)
            p_kept = tl.where(keep, p_t * drop_scale, 0.0)
            dp_t = tl.where(keep, dp_t * drop_scale, 0.0)
        else:
            p_kept = p_t
        dv = tl.dot(p_kept.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,  # (B, H, Lq, D)
    K,  # (B, HKV, Lk, D)
    V,  # (B, HKV, Lk, D)
    DOut,  # (B, H, Lq, D)
    Lse,  # (B, H, Lq) fp32 from the forward
    Delta,  # (B, H, Lq) fp32 from _attn_bwd_delta_kernel
    Mask,  # (B, Lk) uint8, nonzero = attend; read only if HAS_PAD
    Seed,  # 0-dim int64 dropout seed; read only if DROPOUT
    DK,  # (B, HKV, Lk, D) out, k.dtype
    DV,  # (B, HKV, Lk, D) out, k.dtype
    H,
    HKV,
    Lq,
    Lk,
    D,
    causal_shift,
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale
    drop_threshold,
    drop_scale,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (key block, batch * kv head). It owns its rows of dk and dv and sums the
    # whole group of query heads into them in a fixed order: deterministic, no atomics.
    start_n = tl.program_id(0) * BLOCK_N
    kv_bh = tl.program_id(1).to(tl.int64)
    b = kv_bh // HKV
    group = H // HKV
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + kv_bh * Lk * D, cols, offs_d, Lk, D, EVEN_D)
    v = _load_rows(V + kv_bh * Lk * D, cols, offs_d, Lk, D, EVEN_D)
    k0, k1 = _philox_key(Seed, DROPOUT)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # Query blocks in [begin, full_begin) cross the causal diagonal; from full_begin on they see
    # every key of this block (as far as causality goes); queries before begin see none of it.
    begin = 0
    full_begin = 0
    if CAUSAL:
        begin = tl.minimum(tl.maximum(start_n - causal_shift, 0), Lq) // BLOCK_M * BLOCK_M
        first_full_row = tl.maximum(start_n + BLOCK_N - 1 - causal_shift, 0)
        full_begin = tl.maximum(tl.minimum((first_full_row + BLOCK_M - 1) // BLOCK_M * BLOCK_M, Lq), begin)
    for g in range(0, group):
        bh = b * H + (kv_bh % HKV) * group + g
        queries = (
            Q + bh * Lq * D,
            DOut + bh * Lq * D,
            Lse + bh * Lq,
            Delta + bh * Lq,
            Lq,
            D,
            causal_shift,
            qk_scale,
        )
        drop = (bh, k0, k1, drop_threshold, drop_scale)
        if CAUSAL:
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, cols, begin, full_begin, queries, drop,
                True, DROPOUT, EVEN_D, DOT_PRECISION, BLOCK_M, BLOCK_D,
            )  # fmt: skip
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, cols, full_begin, Lq, queries, drop,
            False, DROPOUT, EVEN_D, DOT_PRECISION, BLOCK_M, BLOCK_D,
        )  # fmt: skip

    dk = dk * sm_scale
    if HAS_PAD:
        # A padded-out key gets no probability from any query: its gradients are 0 (and any
        # inf/NaN computed for it is dropped here, by selection).
        allowed = (tl.load(Mask + b * Lk + cols, mask=cols < Lk, other=0) != 0)[:, None]
        dk = tl.where(allowed, dk, 0.0)
        dv = tl.where(allowed, dv, 0.0)
    _store_rows(DK + kv_bh * Lk * D, dk, cols, offs_d, Lk, D, EVEN_D)
    _store_rows(DV + kv_bh * Lk * D, dv, cols, offs_d, Lk, D, EVEN_D)


@triton.jit
def _dq_blocks(
    dq,  # (BLOCK_M, BLOCK_D) fp32 running dq / scale
    q,  # (BLOCK_M, BLOCK_D)
    do,  # (BLOCK_M, BLOCK_D)
    lse2,  # (BLOCK_M,) fp32 lse * log2(e)
    delta,  # (BLOCK_M,) fp32
    rows,
    lo,  # first key block start (a multiple of BLOCK_N)
    hi,  # keys end
    keys,
    drop,
    MASK_CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    KEY_TAIL: tl.constexpr,
    DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Adds the key blocks in [lo, hi) into dq / scale."""
    _, _, _, _, drop_scale = drop
    for start_n in range(lo, hi, BLOCK_N):
        cols, k, v, s = _score_block(
            q, rows, start_n, keys, MASK_CAUSAL, HAS_PAD, KEY_TAIL, EVEN_D, DOT_PRECISION, BLOCK_N, BLOCK_D
        )
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(rows[:, None], cols[None, :], drop)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q,  # (B, H, Lq, D)
    K,  # (B, HKV, Lk, D)
    V,  # (B, HKV, Lk, D)
    DOut,  # (B, H, Lq, D)
    Lse,  # (B, H, Lq) fp32 from the forward
    Delta,  # (B, H, Lq) fp32 from _attn_bwd_delta_kernel
    Mask,  # (B, Lk) uint8, nonzero = attend; read only if HAS_PAD
    Seed,  # 0-dim int64 dropout seed; read only if DROPOUT
    DQ,  # (B, H, Lq, D) out, q.dtype
    H,
    HKV,
    Lq,
    Lk,
    D,
    causal_shift,
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale
    drop_threshold,
    drop_scale,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    KEY_TAIL: tl.constexpr,  # Lk % BLOCK_N != 0
    DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh, rows, q, keys, drop, full_end, end = _query_program(
        Q, K, V, Mask, Seed, H, HKV, Lq, Lk, D, causal_shift, qk_scale, drop_threshold, drop_scale,
        CAUSAL, DROPOUT, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    offs_d = tl.arange(0, BLOCK_D)
    do = _load_rows(DOut + bh * Lq * D, rows, offs_d, Lq, D, EVEN_D)
    # A row with no allowed key has lse = +inf: all its probabilities, hence dq, are 0.
    lse2 = tl.load(Lse + bh * Lq + rows, mask=rows < Lq, other=float("inf")) * _LOG2E_C
    delta = tl.load(Delta + bh * Lq + rows, mask=rows < Lq, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = _dq_blocks(
        dq, q, do, lse2, delta, rows, 0, full_end, keys, drop,
        False, HAS_PAD, KEY_TAIL, DROPOUT, EVEN_D, DOT_PRECISION, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    if CAUSAL:
        dq = _dq_blocks(
            dq, q, do, lse2, delta, rows, full_end, end, keys, drop,
            True, HAS_PAD, KEY_TAIL, DROPOUT, EVEN_D, DOT_PRECISION, BLOCK_N, BLOCK_D,
        )  # fmt: skip
    _store_rows(DQ + bh * Lq * D, dq * sm_scale, rows, offs_d, Lq, D, EVEN_D)


# ----------------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    # TRITON_INTERPRET is read when the kernels are decorated (at import), not at call time.
    return type(_attn_fwd_kernel).__name__ == "InterpretedFunction"


def _device_context(x: torch.Tensor):
    # Triton launches on the current device's current stream: make that x's device.
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


# Launch configurations, (BLOCK_M, BLOCK_N, num_warps, num_stages), for sm_90 (H100), by kernel,
# operand width and head-dim bucket (BLOCK_D <= 64, 128, 256). Chosen from the PTX of these
# kernels compiled offline for sm_90a (ptxas -v), not from timings (no GPU was at hand): each is
# among the largest tiles that compile without register spills, except where noted (the
# dropout variants hold four Philox words per element). Sizes follow the FlashAttention-2
# layout: the forward and dq kernels own a tall query tile and stream keys, the dk/dv kernel
# owns a tall key tile (two fp32 accumulators) and streams narrow query tiles; the owned tile
# shrinks as D grows. float32 runs its ieee dots on FMA units with the operands spread over
# registers, hence much smaller tiles. `python -m dlfast.bench.tune` times alternatives on a GPU.
_CONFIGS = {
    # D=256: 4 bytes of spill per thread, 256 with dropout.
    ("fwd", False): ((128, 64, 4, 3), (128, 64, 8, 3), (64, 32, 8, 2)),
    ("fwd", True): ((32, 32, 4, 2), (32, 16, 8, 2), (32, 16, 8, 1)),
    # D=128 with dropout: about 330 bytes of spill per thread.
    ("dkdv", False): ((32, 128, 8, 3), (32, 64, 8, 2), (32, 32, 8, 1)),
    # D=64 without dropout: about 50 bytes of spill per thread.
    ("dkdv", True): ((16, 64, 4, 2), (16, 32, 4, 1), (16, 32, 8, 1)),
    # D=256 with dropout: 80 bytes of spill per thread.
    ("dq", False): ((64, 32, 4, 3), (128, 32, 8, 2), (32, 32, 4, 1)),
    ("dq", True): ((64, 16, 4, 2), (32, 16, 8, 1), (32, 16, 8, 1)),
}


def _config(kernel: str, block_d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of `kernel` ("fwd", "dkdv" or "dq")."""
    bucket = 0 if block_d <= 64 else 1 if block_d <= 128 else 2
    return _CONFIGS[kernel, dtype == torch.float32][bucket]


def _dot_precision(dtype: torch.dtype) -> str | None:
    # float32 needs exact fp32 products (tf32 misses float32 tolerances); 16-bit operands
    # take the backend's default, their products being exact in the fp32 accumulator anyway.
    return "ieee" if dtype == torch.float32 else None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask) -> None:
    if q.device.type != "cuda" and not (q.device.type == "cpu" and _interpreted()):
        raise RuntimeError(
            f"dlfast Triton attention: tensors on {q.device} need a CUDA GPU, or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton is imported"
        )
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"dlfast Triton attention: q, k, v must share one of float16, bfloat16, float32; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"attention: q (B, H, Lq, D), k and v (B, Hkv, Lk, D); got {q.shape}, {k.shape}, {v.shape}"
        )
    B, H, _, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(
            f"attention: k and v must be (B, Hkv, Lk, D) with Hkv dividing H; got {q.shape}, {k.shape}"
        )
    if not 1 <= D <= 256:
        raise ValueError(f"attention: head dim {D} not supported by the Triton kernels (1..256)")
    if key_padding_mask is not None and key_padding_mask.shape != (B, k.shape[2]):
        raise ValueError(
            f"attention: key_padding_mask must be (B, Lk) = {(B, k.shape[2])}, got {key_padding_mask.shape}"
        )


def _common_args(q, k, key_padding_mask, causal, causal_shift, scale, dropout_p, seed):
    """(positional scalar arguments, tensor placeholders and constexprs) shared by the kernels:
    returns (mask, seed, H, HKV, Lq, Lk, D, shift, causal, drop_threshold, drop_scale)."""
    _, H, Lq, D = q.shape
    HKV, Lk = k.shape[1], k.shape[2]
    # j <= i + shift for every i >= 0 once shift >= Lk - 1: no causal mask at all. For
    # shift <= -Lq no key is allowed anywhere; clamping keeps the argument a 32-bit int.
    if causal and causal_shift >= Lk - 1:
        causal = False
    shift = max(-Lq, min(int(causal_shift), Lk))
    mask = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else q
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("attention: dropout_p > 0 needs a seed tensor")
        seed_t = seed.to(device=q.device, dtype=torch.int64)
        # Same rule as dlfast.reference.dropout_threshold: floor(p * 2^32) in double.
        threshold = min(int(dropout_p * 4294967296.0), 0xFFFFFFFF)
        drop_scale = 1.0 / (1.0 - dropout_p)
    else:
        seed_t, threshold, drop_scale = q, 0, 1.0  # placeholder pointer, never read
    return mask, seed_t, H, HKV, Lq, Lk, D, shift, causal, threshold, drop_scale


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    causal_shift: int,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * q k^T, masked, dropped out) v without storing the scores.

    q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D), Hkv dividing H; one dtype of float16, bfloat16,
    float32; D up to 256. key_padding_mask: (B, Lk) bool (True = attend) or None. seed: 0-dim
    int64 tensor on q's device (None without dropout). Returns out (B, H, Lq, D) in q's dtype and
    lse (B, H, Lq) float32 (natural log; +inf, with zero output, for a row with no allowed key).
    """
    _check_inputs(q, k, v, key_padding_mask)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B = q.shape[0]
    mask, seed_t, H, HKV, Lq, Lk, D, shift, causal, threshold, drop_scale = _common_args(
        q, k, key_padding_mask, causal, causal_shift, scale, dropout_p, seed
    )
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or Lk == 0:
        return out.zero_(), lse.fill_(float("inf"))
    block_d = max(16, triton.next_power_of_2(D))
    block_m, block_n, num_warps, num_stages = _config("fwd", block_d, q.dtype)
    with _device_context(q):
        _attn_fwd_kernel[(triton.cdiv(Lq, block_m), B * H)](
            q, k, v, mask, seed_t, out, lse,
            H, HKV, Lq, Lk, D, shift, scale * _LOG2E, threshold, drop_scale,
            CAUSAL=causal, HAS_PAD=key_padding_mask is not None, KEY_TAIL=Lk % block_n != 0,
            DROPOUT=dropout_p > 0.0, EVEN_D=D == block_d,
            DOT_PRECISION=_dot_precision(q.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    return out, lse


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    causal_shift: int,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of attention_fwd: dq (B, H, Lq, D) in q's dtype, dk and dv (B, Hkv, Lk, D) in
    k's dtype. lse and out are attention_fwd's; the same seed redraws the same dropout mask.

    Always bitwise deterministic: dk and dv are summed over the query heads of a group by one
    program in a fixed order and nothing uses atomics, so `deterministic` is ignored.
    """
    del deterministic  # every run is deterministic
    _check_inputs(q, k, v, key_padding_mask)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    B = q.shape[0]
    mask, seed_t, H, HKV, Lq, Lk, D, shift, causal, threshold, drop_scale = _common_args(
        q, k, key_padding_mask, causal, causal_shift, scale, dropout_p, seed
    )
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = max(16, triton.next_power_of_2(D))
    kv_block_m, kv_block_n, kv_warps, kv_stages = _config("dkdv", block_d, q.dtype)
    q_block_m, q_block_n, q_warps, q_stages = _config("dq", block_d, q.dtype)
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    shared = dict(
        CAUSAL=causal, HAS_PAD=key_padding_mask is not None, DROPOUT=dropout_p > 0.0,
        EVEN_D=D == block_d, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=block_d,
    )  # fmt: skip
    scalars = (H, HKV, Lq, Lk, D, shift, scale * _LOG2E, scale, threshold, drop_scale)
    with _device_context(q):
        # About 32 elements of each operand per thread.
        delta_block_m = max(16, min(128, 4096 // block_d))
        _attn_bwd_delta_kernel[(triton.cdiv(Lq, delta_block_m), B * H)](
            out, dout, delta, Lq, D,
            EVEN_D=D == block_d, BLOCK_M=delta_block_m, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
        _attn_bwd_dkdv_kernel[(triton.cdiv(Lk, kv_block_n), B * HKV)](
            q, k, v, dout, lse, delta, mask, seed_t, dk, dv, *scalars,
            BLOCK_M=kv_block_m, BLOCK_N=kv_block_n, num_warps=kv_warps, num_stages=kv_stages, **shared,
        )  # fmt: skip
        _attn_bwd_dq_kernel[(triton.cdiv(Lq, q_block_m), B * H)](
            q, k, v, dout, lse, delta, mask, seed_t, dq, *scalars, KEY_TAIL=Lk % q_block_n != 0,
            BLOCK_M=q_block_m, BLOCK_N=q_block_n, num_warps=q_warps, num_stages=q_stages, **shared,
        )  # fmt: skip
    return dq, dk, dv
