"""Conv2d + ReLU benchmark cases: dlfast.conv2d_relu against eager F.conv2d + relu (cuDNN on the
GPU, oneDNN on the CPU) and torch.compile of the same.

The shapes are the course models' (a CNN on 28x28 digits, a 3-channel 64x64 image model) and
ResNet-50-like layers (batch 32, 64 -> 64 at 56x56, 256 -> 256 at 14x14), all 3x3 with padding 1,
in NCHW as the course models hold them, with channels_last on the GPU where cuDNN prefers it.
FLOPs: 2 * N * K * P * Q * (C / groups) * R * S for the forward; the backward computes dx and
dweight, two more of the same, so fwd+bwd is 3x.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import dlfast
from dlfast.bench.runner import Case, Impl, Timed, Work, dlfast_impls

PASSES = ("fwd", "fwd+bwd")

# (name, N, C, H, K): 3x3 kernels, stride 1, padding 1.
COURSE_SHAPES = (
    ("mnist-conv1", 64, 1, 28, 32),
    ("mnist-conv2", 64, 32, 28, 64),
    ("rgb64-conv1", 64, 3, 64, 64),
)
RESNET_SHAPES = (("resnet-56x56", 32, 64, 56, 64), ("resnet-14x14", 32, 256, 14, 256))

# Relative error (2-norm) against F.conv2d + relu in fp32 from the same rounded inputs before a
# result counts as wrong: a guard against timing a broken kernel, not the proof of correctness
# (tests/ is). dweight and dbias sum N * P * Q terms, and PyTorch's own bf16 dbias (cuDNN, on
# an H100) was more than 2e-2 off at 64 x 28 x 28, so their bound is wide: a broken kernel is
# off by O(1) or NaN.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
SUMMED_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1.5e-1, torch.float16: 2e-2}


def cases(device: torch.device, quick: bool) -> list[Case]:
    """GPU: every shape in bf16, NCHW and channels_last. CPU: every shape in fp32 and bf16 NCHW.
    --quick: the first course shape only."""
    shapes = COURSE_SHAPES[:1] if quick else COURSE_SHAPES + RESNET_SHAPES
    out = []
    if device.type == "cuda":
        for _name, N, C, H, K in shapes:
            for channels_last in (0, 1):
                out.append(
                    Case(torch.bfloat16, {"N": N, "C": C, "H": H, "K": K, "channels_last": channels_last})
                )
        return out
    for dtype in (torch.float32, torch.bfloat16):
        for _name, N, C, H, K in shapes:
            out.append(Case(dtype, {"N": N, "C": C, "H": H, "K": K, "channels_last": 0}))
    return out


def work(case: Case, pass_: str) -> Work:
    s = case.shape
    fwd = 2 * s["N"] * s["K"] * s["H"] * s["H"] * s["C"] * 9
    return Work(flops=fwd if pass_ == "fwd" else 3 * fwd)


def _eager(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return F.relu(F.conv2d(x, w, b, padding=1))


def _compiled() -> Callable:
    torch._dynamo.reset()  # a fresh cache per case: shape-specialised code, as a fixed model gets
    return torch.compile(_eager, dynamic=False, fullgraph=True)


def _dlfast(backend: str) -> Callable:
    def conv2d_relu(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return dlfast.conv2d_relu(x, w, b, padding=1, backend=backend)

    return conv2d_relu


def implementations(device: torch.device, note: Callable[[str], None]) -> list[Impl]:
    """dlfast's kernel backends that run on `device`, then eager and compiled conv + relu."""
    impls = dlfast_impls(device, note, _dlfast)
    impls.append(Impl("torch", "peer", lambda: _eager))
    impls.append(Impl("torch.compile", "peer", _compiled))
    return impls


def _relative_error(got: Tensor, want: Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def prepare(case: Case, impls: list[Impl], device: torch.device) -> dict[str, dict[str, Timed] | Exception]:
    """The timed callables of each implementation at `case`, or the exception that stopped it.

    Each implementation runs forward and backward once first (compiling what needs compiling),
    checked against F.conv2d + relu in fp32 from the same rounded inputs.
    """
    s = case.shape
    fmt = torch.channels_last if s["channels_last"] else torch.contiguous_format
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(s["N"], s["C"], s["H"], s["H"], device=device, generator=gen).to(case.dtype)
    x0 = x0.contiguous(memory_format=fmt)
    w0 = (torch.randn(s["K"], s["C"], 3, 3, device=device, generator=gen) / (9 * s["C"]) ** 0.5).to(
        case.dtype
    )
    w0 = w0.contiguous(memory_format=fmt)
    b0 = (0.1 * torch.randn(s["K"], device=device, generator=gen)).to(case.dtype)
    dy = torch.randn(s["N"], s["K"], s["H"], s["H"], device=device, generator=gen).to(case.dtype)
    dy = dy.contiguous(memory_format=fmt)

    def expected(mask: Tensor) -> dict[str, Tensor]:
        """fp32 results from the same rounded inputs, the gradients through `mask`: the ReLU mask
        of the implementation checked. Where a pre-activation is within rounding of 0 two correct
        implementations may disagree on the mask, and one flipped element moves dx by about
        1e-3 of its norm at 256 channels, far more than the arithmetic's error."""
        x, w, b = (t.detach().float().requires_grad_() for t in (x0, w0, b0))
        z = F.conv2d(x, w, b, padding=1)
        z.backward(dy.float() * mask)
        return {"y": torch.relu(z).detach(), "dx": x.grad, "dweight": w.grad, "dbias": b.grad}

    prepared: dict[str, dict[str, Timed] | Exception] = {}
    for impl in impls:
        try:
            fn = impl.make()
            x, w, b = (t.detach().requires_grad_() for t in (x0, w0, b0))
            y = fn(x, w, b)
            y.backward(dy)
            got = {"y": y, "dx": x.grad, "dweight": w.grad, "dbias": b.grad}
            for key, want in expected(y.detach() > 0).items():
                err = _relative_error(got[key], want)
                bound = (SUMMED_TOLERANCE if key in ("dweight", "dbias") else TOLERANCE)[case.dtype]
                if not err <= bound:  # `not <=` also catches NaN
                    raise ValueError(
                        f"{key} is off fp32 F.conv2d + relu by relative error {err:.1e} (bound {bound:.0e})"
                    )
            prepared[impl.name] = {
                # Inputs that do not require grad: the inference forward, which saves nothing.
                "fwd": Timed(lambda fn=fn: fn(x0, w0, b0)),
                "fwd+bwd": Timed(lambda fn=fn, x=x, w=w, b=b: fn(x, w, b).backward(dy), [x, w, b]),
            }
        except Exception as exc:  # reported by the runner; the other implementations go on
            prepared[impl.name] = exc
    if device.type == "cuda":
        torch.cuda.synchronize()
    return prepared
