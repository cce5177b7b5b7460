"""The MLP character language model of Bengio et al. (2003), as in the course notes (003 week 13):
the last block_size characters, each looked up in an embedding table C, concatenated, through a
tanh hidden layer, to logits of the next character.

The notes' initialisation fixes are the defaults: the hidden layer's weights scaled by
(5/3) / sqrt(fan_in) (tanh's gain), so its units start unsaturated, and the output layer scaled
by 0.01 with zero bias, so the initial loss is near -ln(1/27) = 3.30 (no character favoured).
The training is the notes' too: minibatch SGD with learning-rate decay (fit), at a rate found by
their learning-rate search (lr_search).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlfast.models.bigram import ALPHABET, VOCAB, encode_words


def context_windows(words: list[str], block_size: int) -> tuple[Tensor, Tensor]:
    """(X, Y): for every character of every '.'-wrapped word, the block_size characters before it
    ('.'-padded at the start) and the character itself."""
    xs, ys = [], []
    for w in words:
        context = [0] * block_size
        for ix in encode_words([w])[1:].tolist():
            xs.append(context)
            ys.append(ix)
            context = context[1:] + [ix]
    return torch.tensor(xs, dtype=torch.long), torch.tensor(ys, dtype=torch.long)


def _steps(n: int, progress: bool, desc: str):
    """range(n), with a tqdm progress bar when progress."""
    if not progress:
        return range(n)
    from tqdm import tqdm

    return tqdm(range(n), desc=desc, unit="step")


class MLPLanguageModel(nn.Module):
    """Embedding C (vocab x n_embd) -> concat of block_size rows -> Linear + tanh (n_hidden) ->
    Linear (vocab). Defaults: the notes' block_size 3, n_embd 10, n_hidden 200, 27 characters.
    Shapes: (B, block_size) character indices -> (B, vocab_size) logits."""

    def __init__(self, vocab_size: int = VOCAB, block_size: int = 3, n_embd: int = 10, n_hidden: int = 200):
        super().__init__()
        self.block_size = block_size
        self.C = nn.Embedding(vocab_size, n_embd)
        self.hidden = nn.Linear(block_size * n_embd, n_hidden)
        self.out = nn.Linear(n_hidden, vocab_size)
        with torch.no_grad():
            fan_in = block_size * n_embd
            self.hidden.weight.normal_().mul_((5 / 3) / fan_in**0.5)
            self.hidden.bias.normal_().mul_(0.01)
            self.out.weight.normal_().mul_(0.01)
            self.out.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.hidden(self.C(x).flatten(1)))
        return self.out(h)

    def fit(
        self,
        words: list[str],
        steps: int = 20000,
        batch_size: int = 32,
        lr: float = 0.1,
        decay_at: float = 0.5,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> list[float]:
        """Minibatch SGD at lr, divided by 10 after decay_at of the steps (the notes' decay), on
        the device the model is on; returns the minibatch loss per step."""
        X, Y = self._windows(words)
        return [
            self._sgd_step(X, Y, batch_size, lr if step < decay_at * steps else lr / 10, generator)
            for step in _steps(steps, progress, "mlp language model")
        ]

    def lr_search(
        self,
        words: list[str],
        n: int = 1000,
        batch_size: int = 32,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> tuple[list[float], list[float]]:
        """The notes' learning-rate search: lre = torch.linspace(-3, 0, n), lrs = 10**lre, one
        minibatch SGD step at each rate in turn. Returns (lre, the minibatch loss of each step):
        plotted against each other, the loss falls, flattens and rises again; a good rate is
        just before it rises. The weights are restored afterwards, so that fit() at the rate
        found starts from the same initialisation."""
        X, Y = self._windows(words)
        lre = torch.linspace(-3, 0, n)
        lrs = 10**lre
        initial = copy.deepcopy(self.state_dict())
        losses = [
            self._sgd_step(X, Y, batch_size, float(lrs[i]), generator)
            for i in _steps(n, progress, "learning-rate search")
        ]
        self.load_state_dict(initial)
        return lre.tolist(), losses

    def _sgd_step(
        self, X: Tensor, Y: Tensor, batch_size: int, lr: float, generator: torch.Generator | None
    ) -> float:
        """One plain SGD step at lr on batch_size random rows of (X, Y); returns their loss."""
        batch = torch.randint(0, len(X), (batch_size,), generator=generator).to(X.device)
        loss = F.cross_entropy(self(X[batch]), Y[batch])
        self.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for p in self.parameters():
                p -= lr * p.grad
        return loss.item()

    def _windows(self, words: list[str]) -> tuple[Tensor, Tensor]:
        """context_windows of `words` on the model's device."""
        device = self.C.weight.device
        return tuple(t.to(device) for t in context_windows(words, self.block_size))

    @torch.no_grad()
    def nll(self, words: list[str]) -> float:
        """Mean negative log-likelihood per predicted character of `words`."""
        X, Y = self._windows(words)
        return float(F.cross_entropy(self(X), Y))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> list[str]:
        """n words, each character drawn by torch.multinomial (on the CPU, where `generator`
        lives) from the model's softmax."""
        out = []
        for _ in range(n):
            context, chars = [0] * self.block_size, []
            while True:
                probs = torch.softmax(self(torch.tensor([context], device=self.C.weight.device)), dim=1).cpu()
                ix = int(torch.multinomial(probs, 1, generator=generator))
                if ix == 0:
                    break
                chars.append(ALPHABET[ix])
                context = context[1:] + [ix]
            out.append("".join(chars))
        return out
