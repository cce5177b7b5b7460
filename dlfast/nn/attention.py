"""Attention layers on dlfast.attention: a drop-in torch.nn.MultiheadAttention and nanoGPT's
causal self-attention block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dlfast.ops.attention import attention, causal_attention


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose attention runs on dlfast.attention.

    Subclassing keeps the constructor, initialisation and state_dict keys. The fused path serves
    need_weights=False (what nn.Transformer* layers pass) with batched inputs in either
    batch_first layout, a bool key_padding_mask (True = padding, as in torch), and an attn_mask
    that is None or causal: recognised from the is_causal hint (as torch trusts it) or by
    comparing a square (L, L) mask with the causal one (bool True above the diagonal, or float
    -inf above and 0 elsewhere, as nn.Transformer.generate_square_subsequent_mask makes it;
    under torch.compile only the hint is used, since comparing values would break the graph).
    need_weights=True needs the attention weights themselves, which a fused kernel never stores,
    so it runs torch's own (slower, L x L) computation, as do add_bias_kv, add_zero_attn,
    unbatched inputs, float key_padding_masks and any other attn_mask. Query rows whose keys are
    all padding give zeros.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        causal = _causal_from_mask(attn_mask, is_causal, query.shape[1 if self.batch_first else 0])
        fused = (
            not need_weights
            and causal is not None
            and query.dim() == 3
            and self.bias_k is None
            and not self.add_zero_attn
            and (key_padding_mask is None or key_padding_mask.dtype == torch.bool)
        )
        if not fused:
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._in_projection(query, key, value)
        N, L, E = q.shape
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        out = attention(  # (N, heads, L, head_dim)
            q,
            k,
            v,
            causal=causal,
            key_padding_mask=None if key_padding_mask is None else ~key_padding_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        out = F.linear(out.transpose(1, 2).reshape(N, L, E), self.out_proj.weight, self.out_proj.bias)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v projections, (N, L, E) each; one matmul when query, key and value are one tensor."""
        if self._qkv_same_embed_dim:
            if query is key and key is value:
                return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        return tuple(F.linear(t, w, b) for t, w, b in zip((query, key, value), weights, biases, strict=True))


def _causal_from_mask(attn_mask: Tensor | None, is_causal: bool, query_len: int) -> bool | None:
    """False without a mask, True for a causal one, None for a mask dlfast cannot fuse."""
    if attn_mask is None:
        return False if not is_causal else None  # torch raises for is_causal without a mask
    if is_causal:
        return True
    L = query_len
    if attn_mask.shape != (L, L) or torch.compiler.is_compiling():
        # Comparing the mask's values is a data-dependent branch that a compiled graph cannot
        # hold; there an unhinted mask takes torch's path, as it would with any other mask.
        return None
    above_diagonal = torch.ones(L, L, dtype=torch.bool, device=attn_mask.device).triu(1)
    if attn_mask.dtype == torch.bool:
        return True if torch.equal(attn_mask, above_diagonal) else None
    causal_float = torch.zeros(L, L, dtype=attn_mask.dtype, device=attn_mask.device)
    causal_float.masked_fill_(above_diagonal, float("-inf"))
    return True if torch.equal(attn_mask, causal_float) else None


class CausalSelfAttention(torch.nn.Module):
    """Masked multi-head self-attention with one fused q/k/v projection, as nanoGPT's block.

    Args:
        d_model: embedding width C; n_heads divides it.
        n_heads: number of heads.
        dropout: dropout on the attention probabilities (inside the kernel) and on the output.
        bias: whether the projections have biases.

    Shapes: (B, T, C) -> (B, T, C). Parameters c_attn (C -> 3C) and c_proj (C -> C) keep
    nanoGPT's names, so its checkpoints load.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"CausalSelfAttention: n_heads ({n_heads}) must divide d_model ({d_model})")
        factory = {"device": device, "dtype": dtype}
        self.c_attn = torch.nn.Linear(d_model, 3 * d_model, bias=bias, **factory)
        self.c_proj = torch.nn.Linear(d_model, d_model, bias=bias, **factory)
        self.resid_dropout = torch.nn.Dropout(dropout)
        self.n_heads = n_heads
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (
            t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v)
        )  # (B, nh, T, hs)
        y = causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, dropout={self.dropout}"


class SDPACausalSelfAttention(CausalSelfAttention):
    """Plain PyTorch twin of CausalSelfAttention (F.scaled_dot_product_attention, is_causal), with
    the same parameters: what dlfast.nn.revert turns a CausalSelfAttention into."""

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
            for t in self.c_attn(x).split(C, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))
