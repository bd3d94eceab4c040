"""Spatial Group-wise Enhance."""
import torch
import torch.nn as nn
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from ._common import check_divisible, fp32_region


@MODELS.register_module()
class SpatialGroupEnhance(BaseModule):
    """Spatial Group-wise Enhance (SGE).

    Paper: "Spatial Group-wise Enhance: Improving Semantic Feature Learning in
    Convolutional Networks", https://arxiv.org/abs/1905.09646.

    The channels are split into ``groups`` contiguous groups. Inside a group,
    every position is scored by the dot product of its feature vector with the
    group's spatial mean vector; the scores are normalised over the positions
    (mean 0, divided by unbiased std + ``eps``), scaled and shifted by a learnt
    per-group ``weight`` and ``bias``, and turned into a sigmoid gate that
    multiplies the group's features.

    With ``weight`` at 0 and ``bias`` at 1 (the paper's init) the gate is the
    constant sigmoid(1), so the network first learns without attention.
    A single position (H x W = 1, common at C5 for small images) has no
    spread: its normalised score is defined as 0, so the gate is
    sigmoid(bias). Statistics are computed in fp32 under autocast; the output
    has the input's dtype.

    Placement in the paper: after the last conv + BN of every residual block
    of all four stages, before the identity is added (mmdet ResNet:
    ``position='after_conv3'``).

    Args:
        in_channels (int): Channels C of the input.
        groups (int): Number of groups G; must divide ``in_channels``.
            Defaults to 64.
        eps (float): Added to the standard deviation. Defaults to 1e-5.
        init_cfg (dict, optional): Initialisation config. Defaults to None.

    Shape:
        (N, C, H, W) in, (N, C, H, W) out.
    """

    _abbr_ = 'sge'

    def __init__(self,
                 in_channels: int,
                 groups: int = 64,
                 eps: float = 1e-5,
                 init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg)
        check_divisible(self, in_channels, groups=groups)
        self.in_channels = in_channels
        self.groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))

    def init_weights(self) -> None:
        super().init_weights()
        if self.init_cfg is None:  # an explicit init_cfg (e.g. Pretrained) has the last word
            nn.init.zeros_(self.weight)
            nn.init.ones_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        positions = h * w
        grouped = x.reshape(n, self.groups, c // self.groups, positions)
        with fp32_region(x):
            xg = grouped.float()
            centre = xg.mean(dim=3, keepdim=True)
            # (N, G, 1, HW): each position's dot product with its group mean.
            score = torch.matmul(centre.transpose(2, 3), xg)
            score = score - score.mean(dim=3, keepdim=True)
            # Unbiased variance; max(., 1) makes a lone position score 0
            # instead of 0 / 0.
            var = score.square().sum(dim=3, keepdim=True) / max(positions - 1, 1)
            # sqrt has an infinite slope at 0, and an all-zero input is common at init
            # (mmdet's zero_init_residual makes bn3 output 0): take the std's gradient
            # there as 0, keeping the forward value exactly sqrt(var).
            spread = var > 0
            std = torch.where(spread, var, torch.ones_like(var)).sqrt() * spread
            score = score / (std + self.eps)
            weight = self.weight.float().view(1, self.groups, 1, 1)
            bias = self.bias.float().view(1, self.groups, 1, 1)
            gate = torch.sigmoid(score * weight + bias)
        return (grouped * gate.to(x.dtype)).reshape(n, c, h, w)
