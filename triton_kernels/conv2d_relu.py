"""Conv2d + bias + ReLU as implicit GEMMs in Triton: no im2col buffer is ever stored.

Semantics are those of the `conv2d_relu_fwd` / `conv2d_relu_bwd` schemas in csrc/dlfast.cpp:
y = relu(conv2d(x, weight, bias, stride, padding, dilation, groups)), x (N, C, H, W), weight
(K, C / groups, R, S), y (N, K, P, Q). Every tensor is addressed through its own strides, so
NCHW, channels_last and non-contiguous views are read in place.

Forward: rows are output pixels (n, p, q), columns the output channels of one group, and the
reduction runs over (r, s, c) of that group, gathered from x with bounds masks (the padding
reads as zeros). Groups are a grid axis; bias and ReLU are applied to the fp32 accumulator.

Backward data: rows are input pixels (n, h, w), columns the input channels of one group, the
reduction runs over (r, s, k): input row h meets output row p = (h + pad - r * dil) / stride
only where that division is exact and in range, which the gather masks. With stride 2 three
taps in four are masked off, so this kernel does the work of a stride-1 one (a per-phase
decomposition would avoid that, at the cost of four launches or a phase grid axis).

Backward weight: rows are the output channels of one group, columns its (c, r, s), and the
reduction runs over the output pixels (n, p, q). That reduction is long and the GEMM often
small, so it is split into chunks whose fp32 partials are summed in a fixed order afterwards;
dbias comes from a separate reduction over (n, p, q) built the same way. No atomics anywhere:
every gradient is bitwise deterministic.

Wherever dy is loaded, g = dy where y > 0 else 0 is formed in registers (the ReLU mask).

The reduction index is flattened over (r, s, channel) and decoded per reduction lane rather
than looped as (r, s) x channel blocks, so that 1 and 3 channels per group (the first layer,
depthwise convs) fill a dot's reduction block instead of padding each (r, s) to 16 channels.
Depthwise convs still use one column of 16 in the forward and dx dots (one channel per group).
Offsets are int32 unless a tensor spans 2**31 elements (INT64_INDEX): each gathered element
holds its own address, and 64-bit ones cost registers that the tiles need.
float32 dots use input_precision="ieee" (tf32 would miss float32 tolerances); float16 and
bfloat16 dots take 16-bit operands and accumulate in float32.

Works on CUDA tensors on a GPU and on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A launch helper shared by the ops' wrappers, defined once in layer_norm.py.
from .layer_norm import _device_context

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Stand-in for the SM count under the interpreter: small, so that the tests still split the
# weight-gradient reduction into a few chunks and exercise the partial sums.
_INTERPRETER_PROGRAMS = 4


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _relu_grad(
    DY,  # (N, K, P, Q) upstream gradient
    Y,  # (N, K, P, Q) forward output
    dy_off,  # element offsets into DY of a tile
    y_off,  # the same elements' offsets into Y
    mask,  # where the element exists
):
    """Tile of g = dy where y > 0 else 0, in dy's dtype; 0 wherever mask is false."""
    dy = tl.load(DY + dy_off, mask=mask, other=0.0)
    y = tl.load(Y + y_off, mask=mask, other=0.0)
    return tl.where(y > 0, dy, 0.0)


@triton.jit
def _gemm_tile(
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INT64_INDEX: tl.constexpr,
):
    """(group, rows, columns, reduction lanes) of this program in the forward and dx grids,
    (pixel blocks, channel blocks within a group, groups); int64 where INT64_INDEX."""
    grp = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    lanes = tl.arange(0, BLOCK_K)
    if INT64_INDEX:
        grp, rows, cols, lanes = grp.to(tl.int64), rows.to(tl.int64), cols.to(tl.int64), lanes.to(tl.int64)
    return grp, rows, cols, lanes


@triton.jit
def _split_pixel(pix, P, Q):
    """(n, p, q) of flat pixel indices over (N, P, Q)."""
    q = pix % Q
    p = (pix // Q) % P
    n = pix // (P * Q)
    return n, p, q


@triton.jit
def _in_image(ih0, iw0, dh, dw, row_ok, col_ok, H, W):
    """Where a (rows, columns) tile of x gathers reads inside the image, at input row
    ih0 + dh and column iw0 + dw (ih0, iw0 per tile row; dh, dw per tile column)."""
    ih = ih0[:, None] + dh[None, :]
    iw = iw0[:, None] + dw[None, :]
    return row_ok[:, None] & col_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)


@triton.jit
def _conv2d_relu_fwd_kernel(
    X,  # (N, C, H, W), any strides
    Wt,  # (K, Cg, R, S), any strides
    Bias,  # (K,); unused (any pointer) unless HAS_BIAS
    Y,  # (N, K, P, Q) out, x.dtype, any strides
    N,
    H,
    W,
    P,
    Q,
    Cg,  # input channels per group
    Kg,  # output channels per group
    R,
    S,
    sx_n,
    sx_c,
    sx_h,
    sx_w,
    sw_k,
    sw_c,
    sw_r,
    sw_s,
    sb,
    sy_n,
    sy_k,
    sy_p,
    sy_q,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    HAS_BIAS: tl.constexpr,
    INT64_INDEX: tl.constexpr,  # some offset may pass 2**31 - 1
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # output pixels per program
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # reduction step over (r, s, c)
):
    grp, rows, cols, lanes = _gemm_tile(BLOCK_M, BLOCK_N, BLOCK_K, INT64_INDEX)
    row_ok = rows < N * P * Q
    col_ok = cols < Kg
    n, p, q = _split_pixel(rows, P, Q)
    ih0 = p * stride_h - pad_h
    iw0 = q * stride_w - pad_w
    # The gather offset separates into a pixel part and a reduction part, so the per-element
    # work is one add; only the bounds test needs both coordinates.
    x_row_off = n * sx_n + grp * Cg * sx_c + ih0 * sx_h + iw0 * sx_w
    k = grp * Kg + cols

    CRS = Cg * R * S
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, CRS, BLOCK_K):
        red = start + lanes
        red_ok = red < CRS
        # Channel fastest: in channels_last memory a reduction step reads contiguous channels.
        c = red % Cg
        s = (red // Cg) % S
        r = red // (Cg * S)
        dh = r * dil_h
        dw = s * dil_w
        x_ok = _in_image(ih0, iw0, dh, dw, row_ok, red_ok, H, W)
        x_red_off = c * sx_c + dh * sx_h + dw * sx_w
        a = tl.load(X + x_row_off[:, None] + x_red_off[None, :], mask=x_ok, other=0.0)
        w_off = (c * sw_c + r * sw_r + s * sw_s)[:, None] + (k * sw_k)[None, :]
        b = tl.load(Wt + w_off, mask=red_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(Bias + k * sb, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # Written as a select rather than tl.maximum so that a NaN stays NaN, as in torch.relu.
    acc = tl.where(acc < 0, 0.0, acc)
    y_off = (n * sy_n + p * sy_p + q * sy_q)[:, None] + (k * sy_k)[None, :]
    tl.store(Y + y_off, acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _conv2d_relu_bwd_data_kernel(
    DY,  # (N, K, P, Q), any strides
    Y,  # (N, K, P, Q) forward output, any strides
    Wt,  # (K, Cg, R, S), any strides
    DX,  # (N, C, H, W) out, x.dtype, any strides
    N,
    H,
    W,
    P,
    Q,
    Cg,
    Kg,
    R,
    S,
    sdy_n,
    sdy_k,
    sdy_p,
    sdy_q,
    sy_n,
    sy_k,
    sy_p,
    sy_q,
    sw_k,
    sw_c,
    sw_r,
    sw_s,
    sdx_n,
    sdx_c,
    sdx_h,
    sdx_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    # constexpr so that the exact-quotient test below divides by a constant (a shift for 2),
    # not by a runtime value per element.
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    INT64_INDEX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # input pixels per program
    BLOCK_N: tl.constexpr,  # input channels per program
    BLOCK_K: tl.constexpr,  # reduction step over (r, s, k)
):
    grp, rows, cols, lanes = _gemm_tile(BLOCK_M, BLOCK_N, BLOCK_K, INT64_INDEX)
    row_ok = rows < N * H * W
    col_ok = cols < Cg
    n, h, w = _split_pixel(rows, H, W)
    c = grp * Cg + cols
    dy_row_off = n * sdy_n
    y_row_off = n * sy_n

    KRS = Kg * R * S
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, KRS, BLOCK_K):
        red = start + lanes
        red_ok = red < KRS
        k = grp * Kg + red % Kg
        s = (red // Kg) % S
        r = red // (Kg * S)
        # Output row p reads input row p * stride - pad + r * dil: invert that, keeping only the
        # exact quotients (th >= 0 is tested first, so a negative remainder never counts).
        th = (h + pad_h)[:, None] - (r * dil_h)[None, :]
        tw = (w + pad_w)[:, None] - (s * dil_w)[None, :]
        p = th // STRIDE_H
        q = tw // STRIDE_W
        g_ok = (th >= 0) & (th % STRIDE_H == 0) & (p < P) & (tw >= 0) & (tw % STRIDE_W == 0) & (q < Q)
        g_ok &= row_ok[:, None] & red_ok[None, :]
        dy_off = dy_row_off[:, None] + (k * sdy_k)[None, :] + p * sdy_p + q * sdy_q
        y_off = y_row_off[:, None] + (k * sy_k)[None, :] + p * sy_p + q * sy_q
        a = _relu_grad(DY, Y, dy_off, y_off, g_ok)
        w_off = (k * sw_k + r * sw_r + s * sw_s)[:, None] + (cols * sw_c)[None, :]
        b = tl.load(Wt + w_off, mask=red_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    dx_off = (n * sdx_n + h * sdx_h + w * sdx_w)[:, None] + (c * sdx_c)[None, :]
    tl.store(DX + dx_off, acc.to(DX.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _conv2d_relu_bwd_weight_kernel(
    DY,  # (N, K, P, Q), any strides
    Y,  # (N, K, P, Q) forward output, any strides
    X,  # (N, C, H, W), any strides
    Partial,  # (n_chunks, K, Cg * R * S) fp32 out, contiguous: one dweight per chunk
    N,
    K,
    H,
    W,
    P,
    Q,
    Cg,
    Kg,
    R,
    S,
    chunk,  # output pixels per chunk, a multiple of BLOCK_K
    n_col_blocks,
    sdy_n,
    sdy_k,
    sdy_p,
    sdy_q,
    sy_n,
    sy_k,
    sy_p,
    sy_q,
    sx_n,
    sx_c,
    sx_h,
    sx_w,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    INT64_INDEX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # output channels per program
    BLOCK_N: tl.constexpr,  # (c, r, s) per program
    BLOCK_K: tl.constexpr,  # reduction step over output pixels
):
    # grid: (channel blocks x (c, r, s) blocks, chunks, groups)
    grp = tl.program_id(2)
    chunk_id = tl.program_id(1)
    rows = (tl.program_id(0) // n_col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    lanes = tl.arange(0, BLOCK_K)
    if INT64_INDEX:
        grp, chunk_id = grp.to(tl.int64), chunk_id.to(tl.int64)
        rows, cols, lanes = rows.to(tl.int64), cols.to(tl.int64), lanes.to(tl.int64)
    CRS = Cg * R * S
    row_ok = rows < Kg
    col_ok = cols < CRS
    k = grp * Kg + rows
    # Columns in weight's (c, r, s) order, so that the partials reshape straight to weight.
    s = cols % S
    r = (cols // S) % R
    c = grp * Cg + cols // (R * S)
    dh = r * dil_h
    dw = s * dil_w
    x_col_off = c * sx_c + dh * sx_h + dw * sx_w
    dy_k_off = k * sdy_k
    y_k_off = k * sy_k

    NPQ = N * P * Q
    start = chunk_id * chunk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for red_start in range(start, tl.minimum(start + chunk, NPQ), BLOCK_K):
        red = red_start + lanes
        red_ok = red < NPQ
        n, p, q = _split_pixel(red, P, Q)
        g_ok = row_ok[:, None] & red_ok[None, :]
        dy_off = dy_k_off[:, None] + (n * sdy_n + p * sdy_p + q * sdy_q)[None, :]
        y_off = y_k_off[:, None] + (n * sy_n + p * sy_p + q * sy_q)[None, :]
        a = _relu_grad(DY, Y, dy_off, y_off, g_ok)
        ih0 = p * stride_h - pad_h
        iw0 = q * stride_w - pad_w
        x_ok = _in_image(ih0, iw0, dh, dw, red_ok, col_ok, H, W)
        x_row_off = n * sx_n + ih0 * sx_h + iw0 * sx_w
        b = tl.load(X + x_row_off[:, None] + x_col_off[None, :], mask=x_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    out_off = chunk_id * K * CRS + k[:, None] * CRS + cols[None, :]
    tl.store(Partial + out_off, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _conv2d_relu_bwd_bias_kernel(
    DY,  # (N, K, P, Q), any strides
    Y,  # (N, K, P, Q) forward output, any strides
    Partial,  # (n_chunks, K) fp32 out, contiguous: one dbias per chunk
    N,
    K,
    P,
    Q,
    chunk,  # output pixels per chunk, a multiple of BLOCK_J
    sdy_n,
    sdy_k,
    sdy_p,
    sdy_q,
    sy_n,
    sy_k,
    sy_p,
    sy_q,
    INT64_INDEX: tl.constexpr,
    BLOCK_K: tl.constexpr,  # channels per program
    BLOCK_J: tl.constexpr,  # output pixels per step
):
    # grid: (channel blocks, chunks)
    chunk_id = tl.program_id(1)
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    lanes = tl.arange(0, BLOCK_J)
    if INT64_INDEX:
        chunk_id, k, lanes = chunk_id.to(tl.int64), k.to(tl.int64), lanes.to(tl.int64)
    k_ok = k < K
    NPQ = N * P * Q
    start = chunk_id * chunk
    # Summed elementwise across steps and reduced once at the end: a fixed order per run.
    acc = tl.zeros((BLOCK_K, BLOCK_J), dtype=tl.float32)
    for red_start in range(start, tl.minimum(start + chunk, NPQ), BLOCK_J):
        red = red_start + lanes
        n, p, q = _split_pixel(red, P, Q)
        dy_off = (k * sdy_k)[:, None] + (n * sdy_n + p * sdy_p + q * sdy_q)[None, :]
        y_off = (k * sy_k)[:, None] + (n * sy_n + p * sy_p + q * sy_q)[None, :]
        g = _relu_grad(DY, Y, dy_off, y_off, k_ok[:, None] & (red < NPQ)[None, :])
        acc += g.to(tl.float32)
    tl.store(Partial + chunk_id * K + k, tl.sum(acc, axis=1), mask=k_ok)


# ----------------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    # TRITON_INTERPRET is read when the kernels are decorated (at import), not at call time.
    return type(_conv2d_relu_fwd_kernel).__name__ == "InterpretedFunction"


def _dot_precision(dtype: torch.dtype) -> str | None:
    # float32 needs exact fp32 products (tf32 misses float32 tolerances); 16-bit operands
    # take the backend's default, their products being exact in the fp32 accumulator anyway.
    return "ieee" if dtype == torch.float32 else None


# Launch configurations (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for sm_90 (H100), by
# whether the operands are float32. Not timed on a GPU yet: chosen from these kernels compiled
# offline for sm_90a (register counts from cuobjdump). The gathers hold a 64-bit address and a
# bounds predicate per element, so with 4 warps the 16-bit 128 x 64 x 32 tile spilled (480 bytes
# of stack per thread in the forward and dx kernels) and the float32 64 x 64 x 16 tile spilled
# too; with 8 warps every kernel fits in 240 registers (16-bit) or 121 (float32) with no spill.
# float32 takes a shorter reduction step because its ieee dots run on FMA units with the
# operands in registers. Every block is clipped to the problem (down to 16, the smallest tl.dot
# side), so small channel counts do not pay for a 64-wide tile.
_CONFIGS = {
    False: (128, 64, 32, 8, 3),
    True: (64, 64, 16, 8, 2),
}
_BIAS_BLOCK_K = 32
_BIAS_BLOCK_J = 128


def _int64_index(*tensors: torch.Tensor) -> bool:
    """Whether an element offset into one of the tensors can pass the int32 range. The kernels'
    int32 offset arithmetic wraps modulo 2**32, so intermediate sums may overflow harmlessly as
    long as every offset actually loaded or stored fits."""
    return any(
        sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) >= 2**31 - 1 for t in tensors
    )


def _config(dtype: torch.dtype, m: int, n: int, k: int, int64_index: bool) -> tuple[int, int, int, int, int]:
    """Launch configuration of a GEMM with m rows, n columns and reduction length k."""
    block_m, block_n, block_k, num_warps, num_stages = _CONFIGS[dtype == torch.float32]
    if int64_index:
        # 64-bit offsets take twice the address registers: the 16-bit 128-row tile spilled
        # (about 400 bytes per thread on sm_90a) where 64 rows fit in 254 registers.
        block_m = min(block_m, 64)

    def clip(block: int, extent: int) -> int:
        return max(16, min(block, triton.next_power_of_2(max(extent, 1))))

    return clip(block_m, m), clip(block_n, n), clip(block_k, k), num_warps, num_stages


def _target_programs(x: torch.Tensor) -> int:
    if x.device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return _INTERPRETER_PROGRAMS


def _chunks(npq: int, tiles: int, block: int, x: torch.Tensor) -> tuple[int, int]:
    """(chunk length, number of chunks) splitting a reduction over npq output pixels among
    enough programs to fill the device, each chunk a whole number of blocks."""
    n_chunks = max(1, min(triton.cdiv(_target_programs(x), tiles), triton.cdiv(npq, block)))
    chunk = triton.cdiv(triton.cdiv(npq, n_chunks), block) * block
    return chunk, triton.cdiv(npq, chunk)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, groups: int) -> None:
    if x.device.type != "cuda" and not (x.device.type == "cpu" and _interpreted()):
        raise RuntimeError(
            f"dlfast Triton conv2d_relu: tensors on {x.device} need a CUDA GPU, or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton is imported"
        )
    if x.dtype == torch.float64:
        raise TypeError(
            "dlfast Triton conv2d_relu: float64 is not supported by the Triton kernels; use the "
            "torch or reference backend"
        )
    if x.dtype not in _SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise TypeError(
            f"dlfast Triton conv2d_relu: x and weight must share one of float16, bfloat16, float32; "
            f"got {x.dtype}, {weight.dtype}"
        )
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"conv2d_relu: x (N, C, H, W) and weight (K, C / groups, R, S); got {tuple(x.shape)}, "
            f"{tuple(weight.shape)}"
        )
    C, K = x.shape[1], weight.shape[0]
    if groups < 1 or C % groups != 0 or K % groups != 0 or weight.shape[1] * groups != C:
        raise ValueError(
            f"conv2d_relu: groups ({groups}) must divide C ({C}) and K ({K}), with weight.shape[1] "
            f"== C / groups; got weight {tuple(weight.shape)}"
        )


def _output_size(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> tuple[int, int]:
    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        raise ValueError(
            f"conv2d_relu: stride, padding, dilation must be (h, w) pairs; got {stride}, {padding}, "
            f"{dilation}"
        )
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"conv2d_relu: stride and dilation must be >= 1 and padding >= 0; got stride {tuple(stride)}, "
            f"padding {tuple(padding)}, dilation {tuple(dilation)}"
        )
    H, W = x.shape[2:]
    R, S = weight.shape[2:]
    P = (H + 2 * padding[0] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + 2 * padding[1] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    if P < 1 or Q < 1:
        raise ValueError(
            f"conv2d_relu: output size ({P}, {Q}) is empty for input {tuple(x.shape)}, kernel "
            f"({R}, {S}), stride {tuple(stride)}, padding {tuple(padding)}, dilation {tuple(dilation)}"
        )
    return P, Q


def _conv_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    # As F.conv2d: channels_last if either operand is laid out that way (and not also NCHW).
    def channels_last(t: torch.Tensor) -> bool:
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()

    if channels_last(x) or channels_last(weight):
        return torch.channels_last
    return torch.contiguous_format


def _conv_args(stride, padding, dilation) -> tuple[int, ...]:
    # The kernels take (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w).
    return tuple(int(v) for pair in (stride, padding, dilation) for v in pair)


def conv2d_relu_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """relu(conv2d(x, weight, bias, stride, padding, dilation, groups)) in one implicit GEMM.

    x: (N, C, H, W); weight: (K, C / groups, R, S); bias: (K,) or None; one dtype of float16,
    bfloat16, float32, any strides. stride, padding (symmetric, >= 0) and dilation are (h, w)
    pairs. Returns y (N, K, P, Q) in x's dtype, channels_last if x or weight is, with
    P = (H + 2 pad_h - dil_h (R - 1) - 1) // stride_h + 1 and Q likewise. Accumulates in fp32.
    """
    _check_inputs(x, weight, groups)
    if bias is not None and (bias.dtype != x.dtype or bias.shape != (weight.shape[0],)):
        raise ValueError(
            f"conv2d_relu: bias must be ({weight.shape[0]},) in {x.dtype}; got {tuple(bias.shape)} "
            f"{bias.dtype}"
        )
    N, C, H, W = x.shape
    K, Cg, R, S = weight.shape
    P, Q = _output_size(x, weight, stride, padding, dilation)
    Kg = K // groups
    memory_format = _conv_memory_format(x, weight)
    y = torch.empty((N, K, P, Q), dtype=x.dtype, device=x.device, memory_format=memory_format)
    if y.numel() == 0:
        return y
    int64_index = _int64_index(x, weight, y)
    block_m, block_n, block_k, num_warps, num_stages = _config(
        x.dtype, N * P * Q, Kg, Cg * R * S, int64_index
    )
    grid = (triton.cdiv(N * P * Q, block_m), triton.cdiv(Kg, block_n), groups)
    with _device_context(x):
        _conv2d_relu_fwd_kernel[grid](
            x, weight, bias if bias is not None else x, y,
            N, H, W, P, Q, Cg, Kg, R, S,
            *x.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0, *y.stride(),
            *_conv_args(stride, padding, dilation),
            HAS_BIAS=bias is not None, INT64_INDEX=int64_index,
            DOT_PRECISION=_dot_precision(x.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    return y


def conv2d_relu_bwd(
    dy: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of conv2d_relu_fwd: (dx, dweight, dbias).

    dy, y: (N, K, P, Q), y being conv2d_relu_fwd's output (its positives are the ReLU mask);
    x, weight as given to the forward; any strides. Returns dx (shape of x), dweight (shape of
    weight) and dbias (K,), all in x's dtype, dx and dweight channels_last if x or weight is.
    output_mask = (dx, dweight, dbias) wanted; an unwanted one is torch.empty(0) and is not
    computed. Bitwise deterministic: the weight and bias reductions are split into chunks
    summed in a fixed order, with no atomics.
    """
    _check_inputs(x, weight, groups)
    N, C, H, W = x.shape
    K, Cg, R, S = weight.shape
    P, Q = _output_size(x, weight, stride, padding, dilation)
    if dy.shape != (N, K, P, Q) or y.shape != dy.shape or dy.dtype != x.dtype or y.dtype != x.dtype:
        raise ValueError(
            f"conv2d_relu_bwd: dy and y must be {(N, K, P, Q)} in {x.dtype}; got {tuple(dy.shape)} "
            f"{dy.dtype}, {tuple(y.shape)} {y.dtype}"
        )
    want_dx, want_dweight, want_dbias = output_mask
    Kg = K // groups
    NPQ = N * P * Q
    conv_args = _conv_args(stride, padding, dilation)
    g_strides = (*dy.stride(), *y.stride())
    int64_index = _int64_index(dy, y, x, weight)
    precision = _dot_precision(x.dtype)
    memory_format = _conv_memory_format(x, weight)
    empty = x.new_empty(0)
    dx, dweight, dbias = empty, empty, empty

    if want_dx:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format)
        if dx.numel() > 0:
            block_m, block_n, block_k, num_warps, num_stages = _config(
                x.dtype, N * H * W, Cg, Kg * R * S, int64_index
            )
            grid = (triton.cdiv(N * H * W, block_m), triton.cdiv(Cg, block_n), groups)
            with _device_context(x):
                _conv2d_relu_bwd_data_kernel[grid](
                    dy, y, weight, dx,
                    N, H, W, P, Q, Cg, Kg, R, S,
                    *g_strides, *weight.stride(), *dx.stride(), *conv_args[2:],
                    STRIDE_H=conv_args[0], STRIDE_W=conv_args[1], INT64_INDEX=int64_index,
                    DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                    num_warps=num_warps, num_stages=num_stages,
                )  # fmt: skip

    if want_dweight:
        CRS = Cg * R * S
        if NPQ == 0 or weight.numel() == 0:
            dweight = torch.zeros_like(weight, memory_format=memory_format)
        else:
            block_m, block_n, block_k, num_warps, num_stages = _config(x.dtype, Kg, CRS, NPQ, int64_index)
            n_col_blocks = triton.cdiv(CRS, block_n)
            tiles = triton.cdiv(Kg, block_m) * n_col_blocks
            chunk, n_chunks = _chunks(NPQ, tiles * groups, block_k, x)
            partial = torch.empty((n_chunks, K, CRS), dtype=torch.float32, device=x.device)
            with _device_context(x):
                _conv2d_relu_bwd_weight_kernel[(tiles, n_chunks, groups)](
                    dy, y, x, partial,
                    N, K, H, W, P, Q, Cg, Kg, R, S, chunk, n_col_blocks,
                    *g_strides, *x.stride(), *conv_args,
                    INT64_INDEX=int64_index or _int64_index(partial), DOT_PRECISION=precision,
                    BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                    num_warps=num_warps, num_stages=num_stages,
                )  # fmt: skip
            dweight = partial.sum(0).view(weight.shape).to(dtype=x.dtype, memory_format=memory_format)

    if want_dbias:
        if NPQ == 0 or K == 0:
            dbias = x.new_zeros(K)
        else:
            k_blocks = triton.cdiv(K, _BIAS_BLOCK_K)
            chunk, n_chunks = _chunks(NPQ, k_blocks, _BIAS_BLOCK_J, x)
            partial = torch.empty((n_chunks, K), dtype=torch.float32, device=x.device)
            with _device_context(x):
                _conv2d_relu_bwd_bias_kernel[(k_blocks, n_chunks)](
                    dy, y, partial, N, K, P, Q, chunk, *g_strides,
                    INT64_INDEX=_int64_index(dy, y), BLOCK_K=_BIAS_BLOCK_K, BLOCK_J=_BIAS_BLOCK_J,
                )  # fmt: skip
            dbias = partial.sum(0).to(x.dtype)

    return dx, dweight, dbias
