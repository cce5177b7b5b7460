"""Sequence-to-vector recurrent forecasters (003 week 9): an RNN, LSTM or GRU reads a window of a
time series and a linear head predicts the next value from its last hidden state. torch.nn's
recurrent layers (cuDNN on the GPU) are used as they are: dlfast has no recurrent op.
"""

from __future__ import annotations

from torch import Tensor, nn

_CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def windows(series: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """(X, y): every window of `length` consecutive values, (N, length, 1), and the value after it."""
    X = series.unfold(0, length, 1)[:-1]
    return X.unsqueeze(-1), series[length:]


class SeqToVec(nn.Module):
    """kind ('rnn', 'lstm' or 'gru') over (N, T, input_size) -> Linear(hidden, 1) on the last
    step's output -> (N,) predictions."""

    def __init__(self, kind: str = "lstm", input_size: int = 1, hidden_size: int = 32, num_layers: int = 1):
        super().__init__()
        if kind not in _CELLS:
            raise ValueError(f"SeqToVec: kind must be one of {sorted(_CELLS)}, got {kind!r}")
        self.rnn = _CELLS[kind](input_size, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)
