"""Bottleneck Attention Module."""
from collections import OrderedDict

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch.autograd.function import once_differentiable

from .. import kernels
from ._common import (
    PointwiseConvSequential,
    check_batch_statistics,
    fp32_region,
    needs_grad,
    reduced_channels,
    stat_dtype,
)


@MODELS.register_module()
class BottleneckAttention(BaseModule):
    """Bottleneck Attention Module (BAM), as in the authors' and PytorchInsight's code.

    Paper: "BAM: Bottleneck Attention Module" (BMVC 2018),
    https://arxiv.org/abs/1807.06514.

    out = x * (1 + sigmoid(Mc(x) * Ms(x))), with the channel map Mc of shape
    (N, C, 1, 1) and the spatial map Ms of shape (N, 1, H, W) broadcast
    against each other. The paper writes sigmoid(Mc + Ms); the authors' code
    (Jongchan/attention-module) and PytorchInsight, whose BAM-ResNet50 the SGE
    paper compares against, multiply the two maps, and their checkpoints were
    trained that way, so the product is used here.

    - Channel map ``channel_att.gate_c``: global average pool, Linear
      C -> C * rd_ratio (``gate_c_fc_0``), BatchNorm1d (``gate_c_bn_1``), ReLU,
      Linear back to C (``gate_c_fc_final``).
    - Spatial map ``spatial_att.gate_s``: 1x1 conv C -> C * rd_ratio
      (``gate_s_conv_reduce0``), BN, ReLU; two 3x3 convs with dilation
      ``dilation`` (``gate_s_conv_di_0``, ``gate_s_conv_di_1``), each with BN
      and ReLU; 1x1 conv to 1 channel (``gate_s_conv_final``).

    The module names are PytorchInsight's, so its BAM-ResNet50 keys
    (``bam1.channel_att.gate_c.gate_c_fc_0.weight`` ...) load with a prefix
    change only. The pool is a true global mean over H x W; the ImageNet code's
    ``avg_pool2d`` with an H x H window equals it only for square maps
    (PytorchInsight's detection copy switched to adaptive pooling too).

    The spatial mean and the channel MLP run in fp32 under autocast; the
    spatial branch's convs run in the autocast dtype and its BatchNorm layers
    see that dtype, as every BN of the backbone does (PyTorch accumulates their
    batch statistics and running statistics in fp32). The output has the
    input's dtype.

    The gating step is :func:`gated`: on the CPU one kernel pass forward and
    one backward (:mod:`mmattn.kernels`), which computes the gate again
    rather than keeping the (N, C, H, W) map for backward.
    The spatial branch's two 1x1 convs run as matrix products on the CPU
    (:func:`~mmattn.blocks._common.pointwise_conv`), faster than the
    convolution call there.

    Batch 1 in training mode: BatchNorm1d cannot normalise a single vector, so
    PyTorch rejects it (the authors' code fails there too). This block raises a
    ValueError that says so unless ``gate_c_bn_1`` is frozen or synchronised:
    detectors trained with 1 image per GPU keep the backbone's
    ``norm_eval=True`` (which puts these BN layers in eval mode, as
    PytorchInsight's detection ResNetBAM does), or convert to SyncBN.

    Placement in the paper: once at the end of stages 1, 2 and 3, on the
    output of each of those stages (after the last block's residual add and
    ReLU), as network attributes ``bam1``..``bam3`` (three modules in total).

    Args:
        in_channels (int): Channels C of the input.
        rd_ratio (float): Hidden width of both branches as a fraction of C.
            Defaults to 1 / 16.
        dilation (int): Dilation (and padding) of the two 3x3 convs.
            Defaults to 4.
        init_cfg (dict, optional): Initialisation config. Defaults to None.

    Shape:
        (N, C, H, W) in, (N, C, H, W) out.
    """

    _abbr_ = 'bam'

    def __init__(self,
                 in_channels: int,
                 rd_ratio: float = 1 / 16,
                 dilation: int = 4,
                 init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg)
        hidden = reduced_channels(self, in_channels, rd_ratio)
        if dilation < 1:
            raise ValueError(f'{type(self).__name__}: dilation={dilation} must be a '
                             'positive integer, e.g. dilation=4 as in the paper.')
        self.in_channels = in_channels
        self.channel_att = nn.ModuleDict(dict(gate_c=nn.Sequential(OrderedDict(
            gate_c_fc_0=nn.Linear(in_channels, hidden),
            gate_c_bn_1=nn.BatchNorm1d(hidden),
            gate_c_relu_1=nn.ReLU(),
            gate_c_fc_final=nn.Linear(hidden, in_channels)))))
        spatial = OrderedDict(
            gate_s_conv_reduce0=nn.Conv2d(in_channels, hidden, 1),
            gate_s_bn_reduce0=nn.BatchNorm2d(hidden),
            gate_s_relu_reduce0=nn.ReLU())
        for i in range(2):
            spatial[f'gate_s_conv_di_{i}'] = nn.Conv2d(
                hidden, hidden, 3, padding=dilation, dilation=dilation)
            spatial[f'gate_s_bn_di_{i}'] = nn.BatchNorm2d(hidden)
            spatial[f'gate_s_relu_di_{i}'] = nn.ReLU()
        spatial['gate_s_conv_final'] = nn.Conv2d(hidden, 1, 1)
        self.spatial_att = nn.ModuleDict(dict(gate_s=PointwiseConvSequential(spatial)))

    def init_weights(self) -> None:
        super().init_weights()
        if self.init_cfg is not None:
            return
        # The authors' effective init: conv weights Kaiming normal (fan_out),
        # Linear weights PyTorch's default, every bias 0, BN weights 1. (Their
        # code meant to zero the spatial BN weights, but its key test never
        # matches, so those are 1 too.)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(module, nn.Linear):
                module.reset_parameters()
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
            if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_c = self.channel_att.gate_c
        check_batch_statistics(self, 'channel_att.gate_c.gate_c_bn_1', x.shape[0],
                               f'batch size {x.shape[0]}')
        with fp32_region(x):
            channel = gate_c(x.mean(dim=(2, 3), dtype=stat_dtype(x)))
        spatial = self.spatial_att.gate_s(x)
        return gated(x, channel.to(x.dtype), spatial.to(x.dtype))


def gated(x: torch.Tensor, channel: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
    """``x * (1 + sigmoid(channel * spatial))`` for (N, C) ``channel`` and (N, 1, H, W)
    ``spatial`` maps: one CPU kernel pass (and one in backward, which computes the gate again
    instead of keeping it) where the kernels take the tensors, else PyTorch's ops."""
    if kernels.usable(x, channel, spatial):
        if needs_grad(x, channel, spatial):
            return _Gated.apply(x, channel, spatial)
        return _gated_by_kernel(x, channel, spatial)
    return torch.addcmul(x, x, (channel[:, :, None, None] * spatial).sigmoid_())


def _gated_by_kernel(x: torch.Tensor, channel: torch.Tensor,
                     spatial: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    torch.ops.mmattn.bam_apply(x, channel, spatial, out)
    return out


class _Gated(torch.autograd.Function):
    """:func:`gated` with autograd on the kernels: keeps x and the two maps, not the gate."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, channel: torch.Tensor,
                spatial: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, channel, spatial)
        return _gated_by_kernel(x, channel, spatial)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        grads = torch.ops.mmattn.bam_apply_backward(grad.contiguous(), *ctx.saved_tensors)
        return tuple(g if needed else None
                     for g, needed in zip(grads, ctx.needs_input_grad, strict=True))
