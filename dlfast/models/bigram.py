"""The bigram character language models of the course notes (week 11): counting and neural.

Characters are the 26 letters a-z and '.', which marks both the start and the end of a word,
27 symbols in all ('.' is index 0). A word w contributes the bigrams of '.' + w + '.'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import dlfast

ALPHABET = ".abcdefghijklmnopqrstuvwxyz"
VOCAB = len(ALPHABET)  # 27
_INDEX = {ch: i for i, ch in enumerate(ALPHABET)}


def encode_words(words: list[str]) -> Tensor:
    """One int64 stream '.w1.w2. ... .wn.': its bigrams are exactly those of every '.' + w + '.'
    (one '.' ends a word and starts the next, so no pair crosses from one word into another)."""
    for w in words:
        bad = set(w) - set(ALPHABET[1:])
        if bad or not w:
            raise ValueError(f"words must be non-empty and lower-case a-z only, got {w!r}")
    return torch.tensor([_INDEX[ch] for ch in "." + ".".join(words) + "."], dtype=torch.long)


def bigram_pairs(words: list[str]) -> tuple[Tensor, Tensor]:
    """(xs, ys): each bigram's first and second character index, the neural model's data."""
    stream = encode_words(words)
    return stream[:-1], stream[1:]


def _sample(next_probs, n: int, generator: torch.Generator | None) -> list[str]:
    """n words drawn character by character from next_probs(index) -> (27,) probabilities."""
    out = []
    for _ in range(n):
        ix, chars = 0, []
        while True:
            ix = int(torch.multinomial(next_probs(ix), 1, replacement=True, generator=generator))
            if ix == 0:
                break
            chars.append(ALPHABET[ix])
        out.append("".join(chars))
    return out


class CountingBigramLM:
    """P(next | current) from bigram counts with +k smoothing, rows normalised.

    fit(words, device) counts with dlfast.bigram_counts on `device` (its CUDA kernel on a GPU);
    probs[a, b] = (N[a, b] + k) / sum_b (N[a, b] + k), kept on the CPU for sampling.
    """

    def __init__(self, smoothing: float = 1.0):
        if smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        self.smoothing = smoothing
        self.counts: Tensor | None = None
        self.probs: Tensor | None = None

    def fit(self, words: list[str], device: str | torch.device = "cpu") -> CountingBigramLM:
        self.counts = dlfast.bigram_counts(encode_words(words).to(device), VOCAB).cpu()
        smoothed = self.counts.double() + self.smoothing
        total = smoothed.sum(1, keepdim=True)
        # Unsmoothed, a character never seen has no evidence at all: its row is uniform.
        self.probs = torch.where(total > 0, smoothed / total.clamp_min(1e-300), 1.0 / VOCAB).float()
        return self

    def _fitted(self) -> Tensor:
        if self.probs is None:
            raise RuntimeError("CountingBigramLM: call fit(words) first")
        return self.probs

    def nll(self, words: list[str]) -> float:
        """Mean negative log-likelihood per bigram of `words` (natural log)."""
        probs = self._fitted()
        counts = dlfast.bigram_counts(encode_words(words), VOCAB).double()
        seen = counts > 0  # 0 * log(0) is 0 here, not NaN: an unseen bigram adds nothing
        return float(-(counts[seen] * probs.double()[seen].log()).sum() / counts.sum())

    def perplexity(self, words: list[str]) -> float:
        return float(torch.tensor(self.nll(words)).exp())

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[str]:
        """n words, each character drawn by torch.multinomial from its row of probs."""
        probs = self._fitted()
        return _sample(lambda ix: probs[ix], n, generator)


class NeuralBigramLM(torch.nn.Module):
    """One-hot(current) -> Linear(27, 27, bias=False) -> logits of the next character.

    Trained by full-batch gradient descent on the cross-entropy plus an L2 penalty on the weights,
    reg * mean(W^2): the penalty pulls every row toward uniform, as +k smoothing does for the
    counting model. With a small penalty the trained model's NLL converges to the unsmoothed
    counting model's, the best any bigram model can do on its training words.
    """

    def __init__(self, reg: float = 0.01, generator: torch.Generator | None = None):
        super().__init__()
        self.reg = reg
        self.W = torch.nn.Linear(VOCAB, VOCAB, bias=False)
        with torch.no_grad():
            self.W.weight.copy_(torch.randn(VOCAB, VOCAB, generator=generator))

    def forward(self, xs: Tensor) -> Tensor:
        """xs: (B,) character indices -> (B, 27) logits."""
        return self.W(F.one_hot(xs, VOCAB).to(self.W.weight.dtype))

    def loss(self, xs: Tensor, ys: Tensor) -> Tensor:
        return F.cross_entropy(self(xs), ys) + self.reg * self.W.weight.square().mean()

    def fit(
        self, words: list[str], steps: int = 200, lr: float = 50.0, progress: bool = False
    ) -> list[float]:
        """Full-batch gradient descent (the notes use lr 50), on the device the model is on;
        returns the loss per step."""
        xs, ys = self._pairs(words)
        losses = []
        steps_iter = range(steps)
        if progress:
            from tqdm import tqdm

            steps_iter = tqdm(steps_iter, desc="neural bigram", unit="step")
        for _ in steps_iter:
            self.W.weight.grad = None
            loss = self.loss(xs, ys)
            loss.backward()
            with torch.no_grad():
                self.W.weight -= lr * self.W.weight.grad
            losses.append(loss.item())
        return losses

    def _pairs(self, words: list[str]) -> tuple[Tensor, Tensor]:
        """bigram_pairs of `words` on the model's device."""
        return tuple(t.to(self.W.weight.device) for t in bigram_pairs(words))

    @torch.no_grad()
    def nll(self, words: list[str]) -> float:
        """Mean negative log-likelihood per bigram of `words` (no penalty)."""
        xs, ys = self._pairs(words)
        return float(F.cross_entropy(self(xs), ys))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> list[str]:
        # Row a: the next-character distribution; on the CPU, where `generator` lives.
        probs = torch.softmax(self.W.weight.t(), dim=1).cpu()
        return _sample(lambda ix: probs[ix], n, generator)
