"""Bigram counting benchmark cases: dlfast.bigram_counts against the torch.bincount composite
torch.bincount(x[:-1] * V + x[1:]) that it replaces.

One stream of uniformly random token ids per case; vocabularies of 27 (the course's characters),
65 (Shakespeare's characters), 256 (bytes) and 4096 (a small BPE). Bytes moved: the token reads
(each token read once), the table being small next to them except at V = 4096; the achieved
GB/s is compared with a device copy measured in the same run. Every token is read, so the rows'
tokens_per_s is the stream's length over the median time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

import dlfast
from dlfast.bench.runner import Case, Impl, Timed, Work, dlfast_impls

PASSES = ("count",)
VOCABS = (27, 65, 256, 4096)


def cases(device: torch.device, quick: bool) -> list[Case]:
    """GPU: 1e6 to 1e9 tokens; CPU: 1e6 and 1e7 (the composite takes seconds per call past that).
    int32 tokens at every vocabulary, uint8 where the ids fit. --quick: 1e6 tokens, V 27."""
    if quick:
        return [Case(torch.int32, {"tokens": 10**6, "V": 27})]
    sizes = (10**6, 10**7, 10**8, 10**9) if device.type == "cuda" else (10**6, 10**7)
    out = []
    for dtype in (torch.int32, torch.uint8):
        for V in VOCABS:
            if dtype == torch.uint8 and V > 256:
                continue
            out += [Case(dtype, {"tokens": n, "V": V}) for n in sizes]
    return out


def work(case: Case, pass_: str) -> Work:
    return Work(bytes=case.shape["tokens"] * case.dtype.itemsize, tokens=case.shape["tokens"])


def _composite(x: Tensor, V: int) -> Tensor:
    return torch.bincount(x[:-1].long() * V + x[1:].long(), minlength=V * V).view(V, V)


def _dlfast(backend: str) -> Callable:
    return lambda x, V: dlfast.bigram_counts(x, V, backend=backend)


def implementations(device: torch.device, note: Callable[[str], None]) -> list[Impl]:
    """dlfast's kernel backends that run on `device`, then the bincount composite ("torch")."""
    return dlfast_impls(device, note, _dlfast) + [Impl("torch", "peer", lambda: _composite)]


def prepare(case: Case, impls: list[Impl], device: torch.device) -> dict[str, dict[str, Timed] | Exception]:
    """Each implementation counts once and must equal the composite exactly before it is timed."""
    V, n = case.shape["V"], case.shape["tokens"]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, V, (n,), device=device, generator=gen, dtype=torch.int64).to(case.dtype)
    want = _composite(x, V)
    prepared: dict[str, dict[str, Timed] | Exception] = {}
    for impl in impls:
        try:
            fn = impl.make()
            if not torch.equal(fn(x, V), want):
                raise ValueError("counts differ from the torch.bincount composite")
            prepared[impl.name] = {"count": Timed(lambda fn=fn: fn(x, V))}
        except Exception as exc:  # reported by the runner; the other implementations go on
            prepared[impl.name] = exc
    if device.type == "cuda":
        torch.cuda.synchronize()
    return prepared
