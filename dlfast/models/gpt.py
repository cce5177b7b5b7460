"""The character-level GPT of the course notes (003 weeks 14-15; 000 "Attention and
transformers"): token and position embeddings, pre-LN blocks of causal multi-head
self-attention and a 4x MLP, a final LayerNorm and a linear head.

Attention is dlfast.nn.CausalSelfAttention (the fused causal attention op) and every LayerNorm
is dlfast.nn.LayerNorm; dlfast.nn.revert gives the plain-PyTorch twin with the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlfast.nn import CausalSelfAttention, LayerNorm


class Block(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x)) (pre-LN)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1 = LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout=dropout)
        self.ln2 = LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer language model.

    Defaults are the notes' Shakespeare model: vocab 65 characters, block_size 256, n_embd 384,
    6 heads, 6 layers, dropout 0.2. Shapes: idx (B, T) int64 with T <= block_size ->
    logits (B, T, vocab_size); with targets (B, T), also the mean cross-entropy.
    """

    def __init__(
        self,
        vocab_size: int = 65,
        block_size: int = 256,
        n_embd: int = 384,
        n_head: int = 6,
        n_layer: int = 6,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, n_embd)
        self.position_embedding = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head, dropout) for _ in range(n_layer)])
        self.ln_f = LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # N(0, 0.02) weights and zero biases, as in the notes (and GPT-2).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"GPT: sequence of {T} tokens is longer than block_size {self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.token_embedding(idx) + self.position_embedding(pos))
        logits = self.lm_head(self.ln_f(self.blocks(x)))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Appends max_new_tokens tokens to idx (B, T), each sampled from the last position's
        logits / temperature, restricted to the top_k most likely when given; the context is
        cropped to the last block_size tokens."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.block_size :])
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_idx = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, next_idx], dim=1)
        return idx


def get_batch(data: Tensor, block_size: int, batch_size: int, generator: torch.Generator | None = None):
    """(x, y): batch_size random windows of block_size tokens from the 1-D `data`, y shifted by one."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[i : i + block_size] for i in starts])
    y = torch.stack([data[i + 1 : i + block_size + 1] for i in starts])
    return x, y
