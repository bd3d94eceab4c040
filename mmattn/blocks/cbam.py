"""Convolutional Block Attention Module."""
from collections import OrderedDict

import torch
import torch.nn as nn
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from ._common import fp32_region, reduced_channels


class _ChannelGate(nn.Module):
    """sigmoid(mlp(avgpool(x)) + mlp(maxpool(x))) as (N, C, 1, 1), in x's dtype."""

    def __init__(self, in_channels: int, hidden: int, act_cfg: dict) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels, hidden),
            build_activation_layer(act_cfg),
            nn.Linear(hidden, in_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fp32_region(x):
            # Both descriptors through the shared MLP in one batch of 2N.
            pooled = torch.cat([x.mean(dim=(2, 3), keepdim=True, dtype=torch.float32),
                                x.amax(dim=(2, 3), keepdim=True).float()])
            from_mean, from_max = self.mlp(pooled).chunk(2)
            gate = torch.sigmoid(from_mean + from_max).to(x.dtype)
        return gate[:, :, None, None]


class _SpatialGate(nn.Module):
    """sigmoid(bn(conv7x7([max, mean] over channels))) as (N, 1, H, W), in x's dtype."""

    def __init__(self, norm_cfg: dict) -> None:
        super().__init__()
        self.spatial = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(2, 1, kernel_size=7, padding=3, bias=False),
            bn=build_norm_layer(norm_cfg, 1)[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fp32_region(x):
            pooled = torch.cat([x.amax(dim=1, keepdim=True).float(),
                                x.mean(dim=1, keepdim=True, dtype=torch.float32)], dim=1)
            return torch.sigmoid(self.spatial(pooled)).to(x.dtype)


@MODELS.register_module()
class ConvolutionalBlockAttention(BaseModule):
    """Convolutional Block Attention Module (CBAM): a channel gate, then a spatial gate.

    Paper: "CBAM: Convolutional Block Attention Module",
    https://arxiv.org/abs/1807.06521. Built as in PytorchInsight
    (github.com/implus/PytorchInsight), the code behind the SGE paper's
    CBAM-ResNet comparisons.

    Channel gate: ``x1 = x * sigmoid(mlp(avgpool(x)) + mlp(maxpool(x)))``
    with one MLP shared by both descriptors (Linear C -> C * ``rd_ratio``,
    activation, Linear back to C). Spatial gate:
    ``out = x1 * sigmoid(bn(conv([max_c(x1), mean_c(x1)])))``, a 7x7 conv
    from the two channel-wise maps (max first) to one map, without bias.

    Parameter and buffer names are the authors' (``ChannelGate.mlp.1.*``,
    ``ChannelGate.mlp.3.*``, ``SpatialGate.spatial.conv.weight``,
    ``SpatialGate.spatial.bn.*``), so their checkpoints load unchanged. The
    init is theirs too: PyTorch's default Linear weights with zero biases,
    Kaiming-normal (fan_out) conv, and the spatial BN's weight and bias at 0,
    so the spatial gate starts as the constant sigmoid(0) = 1/2. Pooling and
    both gates are computed in fp32 under autocast; the output has the
    input's dtype.

    In training mode the spatial BN uses batch statistics over N x H x W
    values, so it needs N * H * W > 1, as the block's own BN right before it
    does. A backbone with ``norm_eval=True`` also freezes this BN.

    Placement in the paper: after the last conv + BN of every residual block,
    before the identity is added (mmdet ResNet: ``position='after_conv3'``).

    Args:
        in_channels (int): Channels C of the input.
        rd_ratio (float): Hidden width of the MLP as a fraction of C.
            Defaults to 1 / 16.
        act_cfg (dict): Activation inside the MLP.
            Defaults to ``dict(type='ReLU')``.
        norm_cfg (dict): Norm after the spatial conv; momentum in PyTorch's
            convention, the number the authors pass to ``nn.BatchNorm2d``.
            Defaults to ``dict(type='BN', momentum=0.01)``.
        init_cfg (dict, optional): Initialisation config. Defaults to None.

    Shape:
        (N, C, H, W) in, (N, C, H, W) out.
    """

    _abbr_ = 'cbam'

    def __init__(self,
                 in_channels: int,
                 rd_ratio: float = 1 / 16,
                 act_cfg: dict = dict(type='ReLU'),
                 norm_cfg: dict = dict(type='BN', momentum=0.01),
                 init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg)
        hidden = reduced_channels(self, in_channels, rd_ratio)
        self.in_channels = in_channels
        self.ChannelGate = _ChannelGate(in_channels, hidden, act_cfg)
        self.SpatialGate = _SpatialGate(norm_cfg)
        self._reset_parameters()

    def init_weights(self) -> None:
        super().init_weights()
        if self.init_cfg is None:
            self._reset_parameters()

    def _reset_parameters(self) -> None:
        # What PytorchInsight's ResNet init does to the module's tensors (keys with
        # 'SpatialGate' and 'bn' get weight 0); mmdet's ResNet init would set the BN to 1.
        for linear in (self.ChannelGate.mlp[1], self.ChannelGate.mlp[3]):
            linear.reset_parameters()
            nn.init.zeros_(linear.bias)
        spatial = self.SpatialGate.spatial
        nn.init.kaiming_normal_(spatial.conv.weight, mode='fan_out', nonlinearity='relu')
        nn.init.zeros_(spatial.bn.weight)
        nn.init.zeros_(spatial.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.ChannelGate(x)
        return x * self.SpatialGate(x)
