"""The Transformer of "Attention Is All You Need" as the course notes build it (003 week 10):
token embeddings scaled by sqrt(d_model), sinusoidal positional encodings, multi-head attention
(with a padding mask in the encoder, a causal mask in the decoder, cross-attention from the
decoder to the encoder), position-wise feed-forward networks, and post-LN residual blocks
(x = LayerNorm(x + Dropout(sublayer(x)))), dropout 0.1.

Three models: encoder-only (with a classification or a regression head), a decoder-only
language model and the encoder-decoder. Attention is dlfast.nn.MultiheadAttention and
normalisation dlfast.nn.LayerNorm; dlfast.nn.revert gives the torch.nn twin with the same
weights. Padding masks follow torch's convention: True marks a padding token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dlfast.nn import LayerNorm, MultiheadAttention


class PositionalEncoding(nn.Module):
    """Adds PE[pos, 2i] = sin(pos / 10000^(2i / d)), PE[pos, 2i + 1] = cos(...), then dropout."""

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.1):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)[:, : d_model // 2]
        self.register_buffer("pe", pe, persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, d_model)."""
        return self.dropout(x + self.pe[: x.shape[1]])


class Embedding(nn.Module):
    """Token embedding * sqrt(d_model) + positional encoding."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int, dropout: float):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        # N(0, 1 / d_model), so that the scaled embedding is of unit size like the positional
        # encoding (the paper's embedding, shared with the output layer, is that small). With
        # nn.Embedding's N(0, 1) the tokens would drown the positions by sqrt(d_model).
        nn.init.normal_(self.tokens.weight, std=d_model**-0.5)
        self.positions = PositionalEncoding(d_model, max_len, dropout)
        self.scale = math.sqrt(d_model)

    def forward(self, idx: Tensor) -> Tensor:
        return self.positions(self.tokens(idx) * self.scale)


def _feed_forward(d_model: int, d_ff: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))


class EncoderLayer(nn.Module):
    """Self-attention over the unpadded tokens, then the feed-forward network, each post-LN."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm1 = LayerNorm(d_model)
        self.ff = _feed_forward(d_model, d_ff, dropout)
        self.norm2 = LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        attended = self.self_attn(x, x, x, key_padding_mask=padding_mask, need_weights=False)[0]
        x = self.norm1(x + self.dropout(attended))
        return self.norm2(x + self.dropout(self.ff(x)))


class DecoderLayer(nn.Module):
    """Causal self-attention, then (with a memory) cross-attention to the encoder's output,
    then the feed-forward network, each post-LN."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, cross_attention: bool):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm1 = LayerNorm(d_model)
        self.cross_attn = (
            MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
            if cross_attention
            else None
        )
        self.norm2 = LayerNorm(d_model) if cross_attention else None
        self.ff = _feed_forward(d_model, d_ff, dropout)
        self.norm3 = LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, memory: Tensor | None = None, memory_padding_mask: Tensor | None = None
    ) -> Tensor:
        T = x.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=x.device, dtype=torch.bool)
        attended = self.self_attn(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
        x = self.norm1(x + self.dropout(attended))
        if self.cross_attn is not None:
            attended = self.cross_attn(
                x, memory, memory, key_padding_mask=memory_padding_mask, need_weights=False
            )[0]
            x = self.norm2(x + self.dropout(attended))
        return self.norm3(x + self.dropout(self.ff(x)))


class Encoder(nn.Module):
    """Embedding, then n_layers encoder layers: (B, S) ids -> ((B, S, d_model), padding mask)."""

    def __init__(self, vocab_size, d_model, n_heads, n_layers, d_ff, dropout, max_len, pad_idx):
        super().__init__()
        self.pad_idx = pad_idx
        self.embed = Embedding(vocab_size, d_model, max_len, dropout)
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))

    def forward(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        padding = idx == self.pad_idx
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x, padding)
        return x, padding


class Decoder(nn.Module):
    """Embedding, n_layers decoder layers (with cross-attention when cross_attention) and the
    vocabulary head: (B, T) ids [, memory, its padding] -> (B, T, vocab_size) logits."""

    def __init__(self, vocab_size, d_model, n_heads, n_layers, d_ff, dropout, max_len, cross_attention):
        super().__init__()
        self.embed = Embedding(vocab_size, d_model, max_len, dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, n_heads, d_ff, dropout, cross_attention) for _ in range(n_layers)
        )
        self.head = nn.Linear(d_model, vocab_size)

    def forward(
        self, idx: Tensor, memory: Tensor | None = None, memory_padding: Tensor | None = None
    ) -> Tensor:
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x, memory, memory_padding)
        return self.head(x)


class EncoderOnly(nn.Module):
    """Encoder-only Transformer with a linear head: (B, T) token ids with pad_idx padding ->
    (B, out_features), the head applied to the mean of the encoder's outputs over the real
    tokens. Defaults: the paper's base model. The notes' two heads are its subclasses
    EncoderClassifier and EncoderRegressor."""

    def __init__(
        self,
        vocab_size: int,
        out_features: int,
        d_model: int = 512,
        n_heads: int = 8,
        n_layers: int = 6,
        d_ff: int = 2048,
        dropout: float = 0.1,
        max_len: int = 5000,
        pad_idx: int = 0,
    ):
        super().__init__()
        self.encoder = Encoder(vocab_size, d_model, n_heads, n_layers, d_ff, dropout, max_len, pad_idx)
        self.head = nn.Linear(d_model, out_features)

    def forward(self, idx: Tensor) -> Tensor:
        x, padding = self.encoder(idx)
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        return self.head((x * keep).sum(1) / keep.sum(1).clamp_min(1.0))


class EncoderClassifier(EncoderOnly):
    """The classification head, Linear(d_model, num_classes): (B, T) ids -> (B, num_classes)
    logits (the notes' optional softmax is left to the loss). Other arguments: EncoderOnly's."""

    def __init__(self, vocab_size: int, num_classes: int, **kwargs):
        super().__init__(vocab_size, num_classes, **kwargs)


class EncoderRegressor(EncoderOnly):
    """The regression head, Linear(d_model, output_dim), returned as it is: (B, T) ids ->
    (B, output_dim) predictions; output_dim 1 (the default) for a single number per sequence.
    Other arguments: EncoderOnly's."""

    def __init__(self, vocab_size: int, output_dim: int = 1, **kwargs):
        super().__init__(vocab_size, output_dim, **kwargs)


class DecoderLM(nn.Module):
    """Decoder-only (causal) language model: (B, T) ids -> (B, T, vocab_size) next-token logits."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 512,
        n_heads: int = 8,
        n_layers: int = 6,
        d_ff: int = 2048,
        dropout: float = 0.1,
        max_len: int = 5000,
    ):
        super().__init__()
        self.decoder = Decoder(
            vocab_size, d_model, n_heads, n_layers, d_ff, dropout, max_len, cross_attention=False
        )

    def forward(self, idx: Tensor) -> Tensor:
        return self.decoder(idx)


class EncoderDecoder(nn.Module):
    """The full Transformer: (B, S) source ids (pad_idx padding) and (B, T) target ids ->
    (B, T, tgt_vocab) logits; the decoder's cross-attention ignores the source's padding."""

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        d_model: int = 512,
        n_heads: int = 8,
        n_layers: int = 6,
        d_ff: int = 2048,
        dropout: float = 0.1,
        max_len: int = 5000,
        pad_idx: int = 0,
    ):
        super().__init__()
        self.encoder = Encoder(src_vocab, d_model, n_heads, n_layers, d_ff, dropout, max_len, pad_idx)
        self.decoder = Decoder(
            tgt_vocab, d_model, n_heads, n_layers, d_ff, dropout, max_len, cross_attention=True
        )

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        memory, padding = self.encoder(src)
        return self.decoder(tgt, memory, padding)
