"""LayerNorm over the last dimension of a 2-D tensor, in Triton.

Forward: one program per block of rows. When a row fits in one block (N <= MAX_FUSED_FWD_N) its
statistics are computed from registers: x is read once, y written once. Wider rows loop over
column chunks: a first pass merges per-chunk (mean, centred sum of squares) pairs with Chan's
formula, a second pass (mostly L2 hits) writes y. Mean and rstd are saved in fp32.

Backward: dx per row; dweight and dbias through per-program fp32 partial sums of shape
(num_programs, N), reduced in a fixed order by a second kernel, so the result does not depend
on scheduling (no float atomics). Rows wider than MAX_FUSED_BWD_N first get their two row
reductions from a separate kernel, then dx and the partials come from a 2-D grid over
(row group, column chunk).

Works on CUDA tensors on a GPU and on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

# Widest rows kept whole in registers; wider rows take the looped path. At 16384 the fused
# backward (which also holds the dweight and dbias accumulators) already spills a little at
# 32 warps (about 170 bytes per thread, sm_90): if that proves slow on a GPU, lowering
# MAX_FUSED_BWD_N sends such rows to the looped backward instead.
MAX_FUSED_FWD_N = 16384
MAX_FUSED_BWD_N = 16384
# Elements per program-iteration tile that narrow rows are packed up to (several rows per
# program), so a program moves enough bytes per step to hide memory latency.
_TILE_ELEMENTS = 4096
# Column chunk of the looped (wide-row) kernels.
_WIDE_CHUNK_N = 4096
# Stand-in for the SM count under the interpreter: small, so that the tests still give each
# backward program several rows and the partial-sum reduction sees several partials.
_INTERPRETER_PROGRAMS = 4


@triton.jit
def _layer_norm_fwd_fused_kernel(
    X,  # (M, N) input; rows stride_x_row apart, columns contiguous
    Y,  # (M, N) output, x.dtype; rows stride_y_row apart
    W,  # (N,) weight; unused (any pointer) unless HAS_WEIGHT
    B,  # (N,) bias; unused (any pointer) unless HAS_BIAS
    Mean,  # (M,) fp32 out: row means, saved for the backward
    Rstd,  # (M,) fp32 out: 1 / sqrt(biased variance + eps), saved for the backward
    stride_x_row,
    stride_y_row,
    M,
    N,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # next_power_of_2(N): the whole row is one block
):
    # int64 row index: M * N may pass 2**31 elements.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]

    x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    # Centred second pass over the registers: no cancellation as in E[x^2] - E[x]^2. Padding
    # lanes are zeroed so they add nothing to the variance.
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)

    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + rows[:, None] * stride_y_row + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_fwd_looped_kernel(
    X,  # (M, N) input; rows stride_x_row apart, columns contiguous
    Y,  # (M, N) output, x.dtype; rows stride_y_row apart
    W,  # (N,) weight; unused (any pointer) unless HAS_WEIGHT
    B,  # (N,) bias; unused (any pointer) unless HAS_BIAS
    Mean,  # (M,) fp32 out: row means
    Rstd,  # (M,) fp32 out: 1 / sqrt(biased variance + eps)
    stride_x_row,
    stride_y_row,
    N,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # column chunk
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x_row
    y_row = Y + row * stride_y_row
    cols = tl.arange(0, BLOCK_N)

    # Each chunk's mean and centred sum of squares come from registers; Chan's pairwise update
    # merges them into the running ones. Every term is centred, so this is as sound as a
    # two-pass variance while reading x only once for the statistics.
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for start in range(0, N, BLOCK_N):
        offs = start + cols
        mask = offs < N
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        n_chunk = tl.minimum(N - start, BLOCK_N).to(tl.float32)
        mean_chunk = tl.sum(x, axis=0) / n_chunk
        xc = tl.where(mask, x - mean_chunk, 0.0)
        m2_chunk = tl.sum(xc * xc, axis=0)
        n_total = count + n_chunk
        delta = mean_chunk - mean
        mean = mean + delta * (n_chunk / n_total)
        m2 = m2 + m2_chunk + delta * delta * (count * n_chunk / n_total)
        count = n_total
    rstd = 1.0 / tl.sqrt_rn(m2 / N + eps)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)

    # Second read of the row: it was read moments ago by this program, so mostly from L2.
    for start in range(0, N, BLOCK_N):
        offs = start + cols
        mask = offs < N
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        if HAS_WEIGHT:
            w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
            y = y * w
        if HAS_BIAS:
            b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
            y = y + b
        tl.store(y_row + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_row_stats_kernel(
    DY,  # (M, N) upstream gradient; rows stride_dy_row apart
    X,  # (M, N) forward input; rows stride_x_row apart
    W,  # (N,) weight; unused (any pointer) unless HAS_WEIGHT
    Mean,  # (M,) fp32 from the forward
    Rstd,  # (M,) fp32 from the forward
    C1,  # (M,) fp32 out: mean over the row of g * xhat, with g = dy * w
    C2,  # (M,) fp32 out: mean over the row of g
    stride_dy_row,
    stride_x_row,
    N,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,  # column chunk
):
    # Only for rows too wide to keep in registers: dx needs these two full-row reductions
    # before any of its columns can be written.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mean = tl.load(Mean + row)
    rstd = tl.load(Rstd + row)
    # Vector accumulators, reduced once at the end: fewer cross-warp reductions, and each lane
    # sums only N / BLOCK_N terms.
    acc_gx = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs = start + cols
        mask = offs < N
        x = tl.load(X + row * stride_x_row + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy_row + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = dy
        if HAS_WEIGHT:
            w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
            g = dy * w
        acc_gx += g * xhat
        acc_g += g
    tl.store(C1 + row, tl.sum(acc_gx, axis=0) / N)
    tl.store(C2 + row, tl.sum(acc_g, axis=0) / N)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N) upstream gradient; rows stride_dy_row apart
    X,  # (M, N) forward input; rows stride_x_row apart
    W,  # (N,) weight; unused (any pointer) unless HAS_WEIGHT
    Mean,  # (M,) fp32 from the forward
    Rstd,  # (M,) fp32 from the forward
    C1,  # (M,) fp32 row means of g * xhat; read only if STATS_GIVEN
    C2,  # (M,) fp32 row means of g; read only if STATS_GIVEN
    DX,  # (M, N) out, x.dtype; rows stride_dx_row apart
    DW_partial,  # (num_row_groups, N) fp32 out: this program's sum of dy * xhat; if COMPUTE_DW
    DB_partial,  # (num_row_groups, N) fp32 out: this program's sum of dy; if COMPUTE_DB
    stride_dy_row,
    stride_x_row,
    stride_dx_row,
    M,
    N,
    rows_per_program,  # a multiple of BLOCK_M
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    STATS_GIVEN: tl.constexpr,  # C1/C2 precomputed (wide rows) instead of reduced here
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per program: the whole row unless STATS_GIVEN
):
    # Grid: (row group, column chunk). Without STATS_GIVEN there is one column chunk holding
    # the whole row, so the row reductions for dx are done here from registers.
    group = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    row_start = group * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)

    # 2-D accumulators, summed over rows once at the end: no cross-warp reduction per tile.
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile_start in range(row_start, row_end, BLOCK_M):
        rows = tile_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        # Padding lanes must be exactly zero: they enter the row sums below.
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if COMPUTE_DW:
            dw_acc += dy * xhat
        if COMPUTE_DB:
            db_acc += dy
        g = dy
        if HAS_WEIGHT:
            # Reloaded per tile (an L1 hit) rather than held across the loop: at the widest
            # fused rows the registers are needed for the accumulators.
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
            g = dy * w[None, :]
        if STATS_GIVEN:
            c1 = tl.load(C1 + rows, mask=row_mask, other=0.0)
            c2 = tl.load(C2 + rows, mask=row_mask, other=0.0)
        else:
            c1 = tl.sum(g * xhat, axis=1) / N
            c2 = tl.sum(g, axis=1) / N
        dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx_row + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

    if COMPUTE_DW:
        tl.store(DW_partial + group * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB_partial + group * N + cols, tl.sum(db_acc, axis=0), mask=col_mask)


@triton.jit
def _layer_norm_bwd_reduce_partials_kernel(
    DW_partial,  # (P, N) fp32 partial sums; read if COMPUTE_DW
    DB_partial,  # (P, N) fp32 partial sums; read if COMPUTE_DB
    DW,  # (N,) out, x.dtype; written if COMPUTE_DW
    DB,  # (N,) out, x.dtype; written if COMPUTE_DB
    P,
    N,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Each program owns a column slice and walks the partials in a fixed order: the sum is the
    # same on every run, which float atomics would not give.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dw_acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for p_start in range(0, P, BLOCK_P):
        parts = p_start + tl.arange(0, BLOCK_P)
        mask = (parts < P)[:, None] & col_mask[None, :]
        offs = parts.to(tl.int64)[:, None] * N + cols[None, :]
        if COMPUTE_DW:
            dw_acc += tl.load(DW_partial + offs, mask=mask, other=0.0)
        if COMPUTE_DB:
            db_acc += tl.load(DB_partial + offs, mask=mask, other=0.0)
    if COMPUTE_DW:
        tl.store(DW + cols, tl.sum(dw_acc, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB + cols, tl.sum(db_acc, axis=0).to(DB.dtype.element_ty), mask=col_mask)


def _interpreted() -> bool:
    # TRITON_INTERPRET is read when the kernels are decorated (at import), not at call time.
    # Compared by name: importing triton's interpreter module would pull in numpy.
    return type(_layer_norm_fwd_fused_kernel).__name__ == "InterpretedFunction"


def _check_device(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and _interpreted():
        return
    raise RuntimeError(
        f"dlfast Triton layer_norm: tensors on {x.device} need a CUDA GPU, or CPU tensors with "
        "TRITON_INTERPRET=1 set before triton is imported"
    )


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_context(x: torch.Tensor):
    # Triton launches on the current device's current stream: make that x's device.
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _row_tile(M: int, block_n: int) -> int:
    """Rows per tile: pack narrow rows up to _TILE_ELEMENTS, never more rows than there are."""
    return max(1, min(_TILE_ELEMENTS // block_n, triton.next_power_of_2(max(M, 1))))


def _fwd_config(M: int, N: int) -> tuple[bool, int, int, int]:
    """(fused, BLOCK_M, BLOCK_N, num_warps) for the forward.

    Fused: about 32 elements per thread at the widest tiles (4 warps for 4096-element tiles,
    16 warps for 16384-wide rows): enough independent 16-byte loads per thread to keep memory
    busy, few enough registers to keep several programs per SM.
    """
    block_n = triton.next_power_of_2(N)
    if block_n <= MAX_FUSED_FWD_N:
        block_m = _row_tile(M, block_n)
        num_warps = min(16, max(1, block_m * block_n // 1024))
        return True, block_m, block_n, num_warps
    return False, 1, _WIDE_CHUNK_N, 8


def _bwd_config(M: int, N: int) -> tuple[bool, int, int, int]:
    """(fused, BLOCK_M, BLOCK_N, num_warps) for the backward.

    Fused: about 16 elements per thread (8 warps for 4096-element tiles up to 32 warps for
    16384-wide rows): the backward holds x, dy and two accumulators per element, twice the
    forward's registers, so it spreads a tile over twice as many threads.
    Looped: column chunks of 2048 with two rows per tile, 8 warps.
    """
    block_n = triton.next_power_of_2(N)
    if block_n <= MAX_FUSED_BWD_N:
        block_m = _row_tile(M, block_n)
        num_warps = min(32, max(1, block_m * block_n // 512))
        return True, block_m, block_n, num_warps
    return False, _row_tile(M, 2048), 2048, 8


def _num_programs(x: torch.Tensor, num_warps: int) -> int:
    """Backward programs that are resident at once: the backward kernel takes about 100-125
    registers per thread (sm_90), so about 16 warps fit per SM. One wave of programs keeps every
    SM busy and the partial-sum buffer (num_programs x N fp32) small."""
    if x.device.type == "cuda":
        return _sm_count(x.device.index) * max(1, min(8, 16 // num_warps))
    return _INTERPRETER_PROGRAMS


def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dimension.

    x: (M, N) float32/float16/bfloat16; weight, bias: (N,) of x's dtype, or None.
    Returns y (M, N) of x's dtype, mean (M,) float32, rstd (M,) float32 with
    rstd = 1 / sqrt(biased variance + eps).
    """
    if x.dim() != 2:
        raise ValueError(f"layer_norm_fwd: x must be 2-D (M, N), got shape {tuple(x.shape)}")
    _check_device(x)
    M, N = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    mean = torch.empty((M,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, mean, rstd
    if N == 0:
        # What torch.native_layer_norm gives: mean 0, variance 0/0.
        return y, mean.zero_(), rstd.fill_(float("nan"))
    w = weight.contiguous() if weight is not None else x  # x: placeholder pointer, never read
    b = bias.contiguous() if bias is not None else x
    fused, block_m, block_n, num_warps = _fwd_config(M, N)
    with _device_context(x):
        if fused:
            _layer_norm_fwd_fused_kernel[(triton.cdiv(M, block_m),)](
                x, y, w, b, mean, rstd,
                x.stride(0), y.stride(0), M, N, eps,
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
            )  # fmt: skip
        else:
            _layer_norm_fwd_looped_kernel[(M,)](
                x, y, w, b, mean, rstd,
                x.stride(0), y.stride(0), N, eps,
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                BLOCK_N=block_n, num_warps=num_warps,
            )  # fmt: skip
    return y, mean, rstd


def layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of layer_norm_fwd.

    dy, x: (M, N) of one dtype; weight: (N,) or None; mean, rstd: (M,) float32 from the forward.
    Returns dx (M, N) of x's dtype; dweight (N,) of x's dtype if weight_grad, else an empty (0,)
    tensor; dbias likewise with bias_grad. dweight and dbias are deterministic.
    """
    if x.dim() != 2 or dy.shape != x.shape:
        raise ValueError(
            f"layer_norm_bwd: x and dy must be 2-D of one shape, got {tuple(x.shape)} and {tuple(dy.shape)}"
        )
    _check_device(x)
    M, N = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if dy.stride(1) != 1:
        dy = dy.contiguous()
    mean = mean.contiguous()
    rstd = rstd.contiguous()
    device = x.device
    dx = torch.empty((M, N), dtype=x.dtype, device=device)

    def empty():
        # A fresh tensor per output: a custom op's outputs may not alias each other.
        return torch.empty((0,), dtype=x.dtype, device=device)

    if M == 0 or N == 0:
        # Sums over no rows are zero.
        dweight = torch.zeros((N,), dtype=x.dtype, device=device) if weight_grad else empty()
        dbias = torch.zeros((N,), dtype=x.dtype, device=device) if bias_grad else empty()
        return dx, dweight, dbias

    w = weight.contiguous() if weight is not None else x  # x: placeholder pointer, never read
    fused, block_m, block_n, num_warps = _bwd_config(M, N)
    n_col_chunks = 1 if fused else triton.cdiv(N, block_n)
    # Row groups: enough programs to fill the GPU once (over all column chunks), each with a
    # whole number of row tiles.
    programs = max(1, _num_programs(x, num_warps) // n_col_chunks)
    programs = min(programs, triton.cdiv(M, block_m))
    rows_per_program = triton.cdiv(triton.cdiv(M, programs), block_m) * block_m
    n_groups = triton.cdiv(M, rows_per_program)

    dw_partial = torch.empty((n_groups, N), dtype=torch.float32, device=device) if weight_grad else mean
    db_partial = torch.empty((n_groups, N), dtype=torch.float32, device=device) if bias_grad else mean
    dweight = torch.empty((N,), dtype=x.dtype, device=device) if weight_grad else empty()
    dbias = torch.empty((N,), dtype=x.dtype, device=device) if bias_grad else empty()

    with _device_context(x):
        if fused:
            c1 = c2 = mean  # placeholders, never read
        else:
            c1 = torch.empty((M,), dtype=torch.float32, device=device)
            c2 = torch.empty((M,), dtype=torch.float32, device=device)
            _layer_norm_bwd_row_stats_kernel[(M,)](
                dy, x, w, mean, rstd, c1, c2,
                dy.stride(0), x.stride(0), N,
                HAS_WEIGHT=weight is not None, BLOCK_N=_WIDE_CHUNK_N, num_warps=8,
            )  # fmt: skip
        _layer_norm_bwd_kernel[(n_groups, n_col_chunks)](
            dy, x, w, mean, rstd, c1, c2, dx, dw_partial, db_partial,
            dy.stride(0), x.stride(0), dx.stride(0), M, N, rows_per_program,
            HAS_WEIGHT=weight is not None, COMPUTE_DW=weight_grad, COMPUTE_DB=bias_grad,
            STATS_GIVEN=not fused, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
        if weight_grad or bias_grad:
            # 4096-element tiles; with many partials (GPU), narrow 32-column slices so that
            # many programs share the work and each walks the partials in few steps.
            reduce_block_p = min(128, triton.next_power_of_2(n_groups))
            reduce_block_n = max(32, 4096 // reduce_block_p)
            _layer_norm_bwd_reduce_partials_kernel[(triton.cdiv(N, reduce_block_n),)](
                dw_partial, db_partial, dweight, dbias, n_groups, N,
                COMPUTE_DW=weight_grad, COMPUTE_DB=bias_grad,
                BLOCK_P=reduce_block_p, BLOCK_N=reduce_block_n, num_warps=4,
            )  # fmt: skip
    return dx, dweight, dbias
