"""dlfast.nn.Conv2dReLU: torch.nn.Conv2d followed by ReLU, as one fused layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dlfast.ops.conv2d_relu import conv2d_relu


class Conv2dReLU(torch.nn.Conv2d):
    """relu(torch.nn.Conv2d(...)(x)) computed by dlfast.conv2d_relu.

    Constructed exactly like torch.nn.Conv2d (in_channels, out_channels, kernel_size, stride,
    padding, dilation, groups, bias, padding_mode, device, dtype), with its initialisation and
    state_dict keys (weight, bias), so a Conv2d's weights load into it unchanged.
    """

    def forward(self, input: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            # Non-zero padding modes pad explicitly first, as torch.nn.Conv2d does.
            padded = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv2d_relu(padded, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv2d_relu(
            input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    @classmethod
    def from_modules(cls, conv: torch.nn.Conv2d, relu: torch.nn.ReLU) -> Conv2dReLU:
        """The fused layer of `conv` then `relu`, sharing conv's parameters (so an optimizer
        that holds them keeps working); conv itself is left unchanged."""
        if type(conv) is not torch.nn.Conv2d:
            raise TypeError(
                f"Conv2dReLU.from_modules: conv must be a torch.nn.Conv2d, got {type(conv).__name__}"
            )
        if not isinstance(relu, torch.nn.ReLU):
            raise TypeError(
                f"Conv2dReLU.from_modules: relu must be a torch.nn.ReLU, got {type(relu).__name__}"
            )
        fused = cls.__new__(cls)
        # A shallow copy of the module's state with its own containers: the same Parameter
        # objects, registered in dicts that later changes to conv do not reach.
        fused.__dict__ = {k: (v.copy() if isinstance(v, dict) else v) for k, v in conv.__dict__.items()}
        return fused


class Conv2dThenReLU(torch.nn.Conv2d):
    """Plain PyTorch twin of Conv2dReLU (torch.nn.Conv2d, then F.relu), with the same state_dict
    keys: what dlfast.nn.revert turns a Conv2dReLU into."""

    def forward(self, input: Tensor) -> Tensor:
        return F.relu(super().forward(input))
