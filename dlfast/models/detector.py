"""A small R-CNN-style detector (003 week 6, "Object Detection": R-CNN, IoU, non-maximum
suppression): a convolutional backbone on Conv2dReLU, a classification head and a box-regression
head (4 outputs) over region crops, trained on the sum of the two heads' losses, and the IoU and
NMS utilities. Its data: dlfast.data.images_with_boxes, one box and its class per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlfast.nn import Conv2dReLU


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every box of a (N, 4) against every box of b (M, 4), boxes as (x1, y1, x2, y2)."""
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(-1)
    area = lambda boxes: (boxes[:, 2:] - boxes[:, :2]).clamp_min(0).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp_min(1e-12)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float = 0.5) -> Tensor:
    """Indices of the boxes kept by greedy non-maximum suppression, highest score first: a box is
    dropped when it overlaps a kept one by more than iou_threshold."""
    order = scores.argsort(descending=True)
    keep = []
    while order.numel() > 0:
        best = order[0]
        keep.append(best)
        if order.numel() == 1:
            break
        overlap = box_iou(boxes[best].unsqueeze(0), boxes[order[1:]])[0]
        order = order[1:][overlap <= iou_threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long)


class RegionDetector(nn.Module):
    """(N, C, S, S) region crops -> (class logits (N, num_classes), box offsets (N, 4)): a backbone
    of [Conv3x3 + ReLU (fused) + MaxPool2] x 2 and two linear heads on its features."""

    def __init__(self, num_classes: int = 2, in_channels: int = 1, crop_size: int = 16):
        super().__init__()
        self.backbone = nn.Sequential(
            Conv2dReLU(in_channels, 16, 3, padding=1),
            nn.MaxPool2d(2),
            Conv2dReLU(16, 32, 3, padding=1),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        features = 32 * (crop_size // 4) ** 2
        self.classifier = nn.Linear(features, num_classes)
        self.box_regressor = nn.Linear(features, 4)

    def forward(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(crops)
        return self.classifier(features), self.box_regressor(features)


def detection_loss(
    outputs: tuple[Tensor, Tensor], labels: Tensor, boxes: Tensor, box_weight: float = 1.0
) -> Tensor:
    """The notes' multi-task loss L = L_cls + L_box: cross-entropy of the class logits against
    labels (N,), plus box_weight times the MSE of the predicted boxes against boxes (N, 4)
    scaled to [0, 1] (the box head's outputs through a sigmoid, so that they land there too)."""
    class_logits, box_offsets = outputs
    box_loss = F.mse_loss(torch.sigmoid(box_offsets), boxes)
    return F.cross_entropy(class_logits, labels) + box_weight * box_loss
