"""Convolutional Block Attention Module."""
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn as nn
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch.autograd.function import once_differentiable

from ._common import (
    Restore,
    channel_dot,
    fp32_region,
    multiply_add_,
    needs_grad,
    reduced_channels,
    spatial_max,
    spatial_mean,
    stat_dtype,
)


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
            pooled = torch.cat([spatial_mean(x), spatial_max(x)])
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
        return self.gate(self.pool(x), x.dtype)

    @staticmethod
    def pool(x: torch.Tensor) -> torch.Tensor:
        """[max, mean] over the channels, (N, 2, H, W) in fp32 (or x's wider dtype)."""
        with fp32_region(x):
            dtype = stat_dtype(x)
            return torch.cat([x.amax(dim=1, keepdim=True).to(dtype),
                              x.mean(dim=1, keepdim=True, dtype=dtype)], dim=1)

    def gate(self, pooled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The (N, 1, H, W) gate from the pooled maps, in ``dtype``."""
        with fp32_region(pooled):
            return torch.sigmoid(self.spatial(pooled)).to(dtype)


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

    In :class:`~mmattn.backbones.AttnResNet` both gates are applied in place and
    the spatial one inside the residual add (``fused_residual``); backward keeps
    the two gates and the spatial pool's argmax, and recomputes the block's
    input from bn3's input instead of keeping it (see ``mmattn.blocks._common``).

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

    def fused_residual(self, x: torch.Tensor, identity: torch.Tensor,
                       restore: Restore | None = None) -> torch.Tensor:
        """``identity + self(x)`` for a backbone that gives ``x`` up (see ``blocks._common``).

        Both products are written over x. With autograd, backward keeps the two gates and the
        spatial pool's argmax, plus ``restore.source`` (without ``restore``: x and x times the
        channel gate), and recomputes x once for both gates' gradients.
        """
        channel = self.ChannelGate(x)
        spatial_gate = self.SpatialGate
        if not needs_grad(x, identity, channel, *spatial_gate.parameters()):
            x = x.mul_(channel)
            return multiply_add_(x, spatial_gate(x), identity)
        source, fn = (restore.source, restore.fn) if restore is not None else (None, None)
        shared: dict = {}  # the recomputed x, from the later function's backward to the earlier's
        x, pooled = _ChannelProductPool.apply(x, channel, source, fn, shared)
        spatial = spatial_gate.gate(pooled, x.dtype)
        return _SpatialProductResidual.apply(x, spatial, identity, channel, source, fn, shared)


def _recompute(kept: torch.Tensor, fn: Callable | None, shared: dict) -> torch.Tensor:
    """The block's input x: the kept tensor, or recomputed (once) from it."""
    if fn is None:
        return kept
    if 'x' not in shared:
        shared['x'] = Restore(kept, fn)()
    return shared['x']


class _ChannelProductPool(torch.autograd.Function):
    """x1 = x * channel gate, and [max, mean] of x1 over the channels (N, 2, H, W).

    Keeps the channel gate, the argmax and x's source (or x); x1 is written over x when x can be
    recomputed.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, channel: torch.Tensor, source: torch.Tensor | None,
                fn: Callable | None, shared: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if fn is None:
            product = x * channel
        else:
            ctx.mark_dirty(x)
            product = x.mul_(channel)
        with fp32_region(product):
            dtype = stat_dtype(product)
            peak, index = product.max(dim=1, keepdim=True)
            pooled = torch.cat([peak.to(dtype), product.mean(dim=1, keepdim=True, dtype=dtype)],
                               dim=1)
        ctx.fn, ctx.shared = fn, shared
        ctx.save_for_backward(x if fn is None else source, channel, index)
        ctx.mark_non_differentiable(index)
        return product, pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_product: torch.Tensor | None, grad_pooled: torch.Tensor | None):
        kept, channel, index = ctx.saved_tensors
        x = _recompute(kept, ctx.fn, ctx.shared)
        ctx.shared.clear()
        dtype = stat_dtype(x)
        if grad_product is None:
            grad_product = torch.zeros((), dtype=dtype, device=x.device)
        if grad_pooled is None:
            total = grad_product.to(dtype).expand(x.shape).clone()
        else:
            # The gradient reaching x1: its own, the mean's (spread over the channels) and the
            # max's (at each position's argmax channel).
            total = torch.add(grad_product, grad_pooled[:, 1:] / x.shape[1]).to(dtype)
            total.scatter_add_(1, index, grad_pooled[:, :1].to(dtype))
        grad_channel = channel_dot(total, x).to(channel.dtype)
        grad_x = total.mul_(channel).to(x.dtype)
        return grad_x, grad_channel, None, None, None


class _SpatialProductResidual(torch.autograd.Function):
    """identity + x1 * spatial gate, keeping the gates and x1's source (or x1)."""

    @staticmethod
    def forward(ctx, product: torch.Tensor, spatial: torch.Tensor, identity: torch.Tensor,
                channel: torch.Tensor, source: torch.Tensor | None, fn: Callable | None,
                shared: dict) -> torch.Tensor:
        ctx.fn, ctx.shared = fn, shared
        if fn is None:
            ctx.save_for_backward(product, spatial, channel)
            return torch.mul(product, spatial).add_(identity)
        ctx.save_for_backward(source, spatial, channel)
        ctx.mark_dirty(product)
        return product.mul_(spatial).add_(identity)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        kept, spatial, channel = ctx.saved_tensors
        product = kept if ctx.fn is None else _recompute(kept, ctx.fn, ctx.shared) * channel
        # sum over the channels of grad * x1, then grad * spatial written into the same memory.
        both = grad * product
        grad_spatial = both.sum(dim=1, keepdim=True, dtype=stat_dtype(both)).to(spatial.dtype)
        grad_product = torch.mul(grad, spatial, out=both) if both.dtype == grad.dtype \
            else grad * spatial
        grad_identity = grad if ctx.needs_input_grad[2] else None
        return grad_product, grad_spatial, grad_identity, None, None, None, None
