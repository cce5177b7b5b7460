"""Every dlfast op in a few lines of plain PyTorch, written from the definition.

This is the oracle of the tests and the `reference` backend. It computes in float32
(float64 for float64 input) from the given, already rounded inputs and rounds once at the end,
which is what the fused kernels do too.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def layer_norm(
    x: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing `normalized_shape` dims.

    The variance is biased (divides by N), as in torch.nn.functional.layer_norm.
    """
    dims = tuple(range(-len(normalized_shape), 0))
    xf = x.to(_acc_dtype(x))
    mean = xf.mean(dims, keepdim=True)
    var = (xf - mean).square().mean(dims, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype)


_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_BUMP = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of a * b for a constant a and int64 b in [0, 2^32), exactly:
    the product needs 64 unsigned bits, so it is built from 16-bit halves in int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    cross = a_hi * b_lo + a_lo * b_hi  # < 2^33
    low_part = cross * 65536 + a_lo * b_lo  # < 2^50
    hi = a_hi * b_hi + (low_part >> 32)
    return hi & _U32, low_part & _U32


def philox4x32_10(key: tuple[int, int], counter: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    """Word 0 of the Philox4x32-10 block (Salmon et al., SC'11; Random123's constants) for int64
    counter words in [0, 2^32); the counter-based generator every dlfast dropout kernel uses."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_ROUND[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_ROUND[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_KEY_BUMP[0]) & _U32, (k1 + _PHILOX_KEY_BUMP[1]) & _U32
    return c0


def dropout_threshold(dropout_p: float) -> int:
    """The 32-bit draw below which a probability is dropped: floor(p * 2^32), computed in double."""
    return min(int(dropout_p * 4294967296.0), _U32)


def dropout_keep_mask(seed: int, B: int, H: int, Lq: int, Lk: int, dropout_p: float, device=None) -> Tensor:
    """(B, H, Lq, Lk) bool: which attention probabilities survive dropout, as every dlfast
    attention kernel draws them. Element [b, h, i, j] is kept iff
    philox4x32_10(key=(seed low 32 bits, seed high 32 bits), counter=(j, i, b * H + h, 0))[0]
    >= dropout_threshold(dropout_p). Counter-based, so the backward redraws the forward's mask."""
    seed &= 0xFFFFFFFFFFFFFFFF
    key = (seed & _U32, seed >> 32)
    j = torch.arange(Lk, device=device).view(1, 1, Lk)
    i = torch.arange(Lq, device=device).view(1, Lq, 1)
    bh = torch.arange(B * H, device=device).view(B * H, 1, 1)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    draw = philox4x32_10(key, torch.broadcast_tensors(j, i, bh, zero))
    return (draw >= dropout_threshold(dropout_p)).view(B, H, Lq, Lk)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    causal_shift: int = 0,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> Tensor:
    """softmax(scale * q k^T, masked) v, materialising the (Lq, Lk) scores.

    q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D) with Hkv dividing H (query head h reads key/value
    head h // (H // Hkv), as SDPA's enable_gqa). Query i attends key j iff key_padding_mask[b, j]
    (True = attend) and, when causal, j <= i + causal_shift. A row that may attend nothing
    gives zeros. With dropout_p > 0 the probabilities are multiplied by
    dropout_keep_mask(seed, ...) / (1 - dropout_p).
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    acc = _acc_dtype(q)
    group = H // k.shape[1]
    qf = q.to(acc)
    kf = k.to(acc).repeat_interleave(group, dim=1)
    vf = v.to(acc).repeat_interleave(group, dim=1)
    if scale is None:
        scale = D**-0.5 if D > 0 else 1.0  # no features: the output is empty whatever the scale
    scores = (qf @ kf.transpose(-1, -2)) * scale
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        rows = torch.arange(Lq, device=q.device).view(Lq, 1)
        allowed = torch.arange(Lk, device=q.device).view(1, Lk) <= rows + causal_shift
    allowed = allowed.expand(B, 1, Lq, Lk)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.view(B, 1, 1, Lk)
    # A row with no allowed key would be softmax(all -inf) = NaN; its scores are left finite
    # and its probabilities zeroed, so neither the output nor the gradient sees a NaN.
    scores = scores.masked_fill(~allowed & allowed.any(-1, keepdim=True), float("-inf"))
    probs = torch.softmax(scores, dim=-1) * allowed
    if dropout_p > 0:
        keep = dropout_keep_mask(seed, B, H, Lq, Lk, dropout_p, device=q.device)
        probs = probs * keep / (1.0 - dropout_p)
    return (probs @ vf).to(q.dtype)


def conv2d_relu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> Tensor:
    """relu(conv2d(x, weight, bias)) as im2col and a matrix product per group.

    x: (N, C, H, W); weight: (K, C / groups, R, S); bias: (K,) or None; padding symmetric.
    Output (N, K, P, Q) with P = (H + 2 pad_h - dil_h (R - 1) - 1) // stride_h + 1 (Q alike):
    y[n, k, p, q] = relu(bias[k] + sum over c, r, s of weight[k, c, r, s] *
    x[n, g C/groups + c, p stride_h - pad_h + r dil_h, q stride_w - pad_w + s dil_w]), zero
    outside x, where g = k // (K / groups).
    """
    N, C, H, W = x.shape
    K, Cg, R, S = weight.shape
    P = (H + 2 * padding[0] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + 2 * padding[1] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    acc = _acc_dtype(x)
    # (N, C * R * S, P * Q): the unfold's channel index is c * R * S + r * S + s.
    cols = torch.nn.functional.unfold(x.to(acc), (R, S), dilation=dilation, padding=padding, stride=stride)
    cols = cols.view(N, groups, Cg * R * S, P * Q)
    w = weight.to(acc).reshape(groups, K // groups, Cg * R * S)
    y = torch.einsum("gkj,ngjl->ngkl", w, cols).reshape(N, K, P, Q)
    if bias is not None:
        y = y + bias.to(acc).view(1, K, 1, 1)
    return torch.relu(y).to(x.dtype)


def ngram_ids(
    tokens: Tensor, vocab_size: int, n: int, ignore_index: int | None = None
) -> tuple[Tensor, Tensor]:
    """The n-grams of adjacent tokens in the rows of the 2-D `tokens`, each as one int64 id
    ((t0 V + t1) V + ...) + tn-1, in row-major order of their first token; n-grams never cross
    rows, and those containing ignore_index or a token outside [0, V) are left out. Also
    returns the mask of `tokens` that are outside [0, V) and not ignore_index."""
    t = tokens.long()
    rows, L = t.shape
    bad = (t < 0) | (t >= vocab_size)
    usable = ~bad
    if ignore_index is not None:
        bad &= t != ignore_index
        usable &= t != ignore_index
    starts = max(L - n + 1, 0)
    ids = torch.zeros(rows, starts, dtype=torch.long, device=t.device)
    keep = torch.ones(rows, starts, dtype=torch.bool, device=t.device)
    for k in range(n):
        ids = ids * vocab_size + t[:, k : k + starts].clamp(0, vocab_size - 1)
        keep &= usable[:, k : k + starts]
    return ids[keep], bad


def ngram_counts(
    tokens: Tensor, vocab_size: int, n: int, ignore_index: int | None = None
) -> tuple[Tensor, int]:
    """How often each n-gram of adjacent tokens occurs in the rows of the 2-D `tokens`: the flat
    (vocab_size ** n,) int64 table, torch.bincount of ngram_ids. Also returns the smallest flat
    position of a token outside [0, V) that is not ignore_index, or -1."""
    ids, bad = ngram_ids(tokens, vocab_size, n, ignore_index)
    first_bad = int(bad.flatten().nonzero()[0, 0]) if bool(bad.any()) else -1
    return torch.bincount(ids, minlength=vocab_size**n), first_bad
