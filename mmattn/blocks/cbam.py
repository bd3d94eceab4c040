"""Convolutional Block Attention Module."""
import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch.autograd.function import once_differentiable

from .. import kernels
from ._common import (
    Restore,
    fp32_region,
    grad_sums,
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
            gate = self.from_pools(spatial_mean(x), spatial_max(x)).to(x.dtype)
        return gate[:, :, None, None]

    def from_pools(self, mean: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
        """The (N, C) gate from x's (N, C) spatial mean and max, in their dtype."""
        # Both descriptors through the shared MLP in one batch of 2N.
        from_mean, from_max = self.mlp(torch.cat([mean, peak])).chunk(2)
        return torch.sigmoid(from_mean + from_max)


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
    the two gates and the pools' argmaxes, and recomputes the block's input
    from bn3's input instead of keeping it (see ``mmattn.blocks._common``). On
    the CPU, float32 and float64 tensors go through fused kernels
    (:mod:`mmattn.kernels`) that never store x times the channel gate.

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
        if self._kernels_take(x):
            return _with_kernels(self, x, None, None)
        x = x * self.ChannelGate(x)
        return x * self.SpatialGate(x)

    def fused_residual(self, x: torch.Tensor, identity: torch.Tensor,
                       restore: Restore | None = None) -> torch.Tensor:
        """``identity + self(x)`` for a backbone that gives ``x`` up (see ``blocks._common``).

        Both products are written over x. With autograd, backward keeps the two gates and the
        spatial pool's argmax, plus ``restore.source`` (without ``restore``: x and x times the
        channel gate), and recomputes x once for both gates' gradients.
        """
        if self._kernels_take(x, identity):
            return _with_kernels(self, x, identity, restore)
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

    def folds_norm(self, src: torch.Tensor, identity: torch.Tensor) -> bool:
        """Whether :meth:`fused_norm_residual` takes these tensors: the CPU kernels do."""
        return self._kernels_take(src, identity)

    def _kernels_take(self, *tensors: torch.Tensor) -> bool:
        """Whether the CPU kernels take these tensors and the block's parameters."""
        return kernels.usable(*tensors, *self.parameters())

    def fused_norm_residual(self, src: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                            identity: torch.Tensor) -> torch.Tensor:
        """``identity + self(src * scale + shift)``: a frozen BN before the block folded in, for
        tensors :meth:`folds_norm` accepts. The kernels compute the BN's output where they read
        it, so its own pass and its backward disappear; ``scale`` and ``shift`` (C, ) carry
        autograd to the BN's weight and bias."""
        return _with_kernels(self, src, identity, affine=(scale.contiguous(), shift.contiguous()))


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
        grad_channel = grad_sums(total, x, with_grad_sum=False)[0].view_as(channel)
        grad_channel = grad_channel.to(channel.dtype)
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


# ---------------------------------------------------------------------------------------------
# The fused CPU kernels (mmattn/kernels/cbam.cpp): x * channel * spatial (+ identity) without
# storing x * channel, in three passes over x forward and three backward.


def _with_kernels(block: ConvolutionalBlockAttention, x: torch.Tensor,
                  identity: torch.Tensor | None, restore: Restore | None = None,
                  affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The block (plus ``identity``, written over x when x may be) through the kernels.

    With ``affine`` = (scale, shift), x is a frozen BN's input and the block's input is
    ``x * scale + shift`` per channel.
    """
    scale, shift = affine if affine is not None else (None, None)
    params = list(block.parameters())
    if needs_grad(x, scale, shift, identity, *params):
        source, fn = (restore.source, restore.fn) if restore is not None else (None, None)
        return _KernelCBAM.apply(block, x, scale, shift, identity, source, fn, *params)
    ops = torch.ops.mmattn
    out = torch.empty_like(x) if identity is None else x
    gates = _kernel_gates(block)
    if gates is not None:
        ops.cbam_inference(x, scale, shift, identity, out, *gates)
        return out
    mean, peak, _ = ops.channel_pools(x, scale, shift, False)
    channel = block.ChannelGate.from_pools(mean, peak)
    pooled, _ = ops.cbam_spatial_pools(x, scale, shift, channel)
    with _native_convolution():
        spatial = block.SpatialGate.gate(pooled, x.dtype)
    ops.cbam_apply(x, scale, shift, channel, spatial, identity, out)
    return out


def _kernel_gates(block: ConvolutionalBlockAttention) -> tuple | None:
    """The weights the gate kernels take (``cbam_inference``; ``cbam_channel_gate``,
    ``cbam_spatial_gate`` and their backward), or None where their fixed forms do not cover the
    block (then the gates run in PyTorch, with autograd graphs): a ReLU MLP, and a square
    odd-sized conv without bias followed by a BN that uses its running statistics."""
    _, first, act, second = block.ChannelGate.mlp
    conv, norm = block.SpatialGate.spatial
    if (type(act) is not nn.ReLU or first.bias is None or second.bias is None
            or type(norm) is not nn.BatchNorm2d or norm.training or norm.running_mean is None
            or norm.running_var.dtype != conv.weight.dtype
            or conv.bias is not None or conv.kernel_size[0] != conv.kernel_size[1]
            or conv.padding != (conv.kernel_size[0] // 2,) * 2 or conv.stride != (1, 1)
            or conv.dilation != (1, 1)):
        return None
    return (first.weight, first.bias, second.weight, second.bias, conv.weight,
            norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)


class _KernelCBAM(torch.autograd.Function):
    """identity + x * channel * spatial as one autograd node, x = src * scale + shift with a
    frozen BN folded in.

    The kernels do the passes over the feature maps. The two gates (the MLP from x's pools, the
    conv from the channel-wise pools of x * channel) are kernel ops too, forward and backward,
    where :func:`_kernel_gates` covers the block (a frozen spatial BN); otherwise their graphs
    are recorded in forward from leaves that stand for the pools, and differentiated with
    :func:`torch.autograd.grad` in backward. Backward keeps x (or src, or what recomputes x),
    the two gates, the pools and the pools' argmaxes.
    """

    @staticmethod
    def forward(ctx, block: ConvolutionalBlockAttention, x: torch.Tensor,
                scale: torch.Tensor | None, shift: torch.Tensor | None,
                identity: torch.Tensor | None, source: torch.Tensor | None,
                fn: Callable | None, *params: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.mmattn
        mean, peak, max_index = ops.channel_pools(x, scale, shift, True)
        weights = _kernel_gates(block)
        if weights is not None:  # the gates as kernel ops, and their backward as two more
            gate = ops.cbam_channel_gate(mean, peak, *weights[:4])
            pooled, pool_index = ops.cbam_spatial_pools(x, scale, shift, gate)
            spatial_gate = ops.cbam_spatial_gate(pooled, *weights[4:])
            ctx.graphs = None
            ctx.gate_inputs = (weights, mean, peak, pooled)
        else:  # the gates' graphs, for autograd.grad in backward
            leaves = [mean.requires_grad_(), peak.requires_grad_()]
            with torch.enable_grad():
                channel = block.ChannelGate.from_pools(*leaves)
            gate = channel.detach()
            pooled, pool_index = ops.cbam_spatial_pools(x, scale, shift, gate)
            pooled.requires_grad_()
            with torch.enable_grad(), _native_convolution():
                spatial = block.SpatialGate.gate(pooled, x.dtype)
            spatial_gate = spatial.detach()
            ctx.graphs = (channel, leaves, spatial, pooled)
        # x (the BN's output) is overwritten when it can be recomputed, never the BN's input.
        in_place = fn is not None and identity is not None
        out = x if in_place else torch.empty_like(x)
        ops.cbam_apply(x, scale, shift, gate, spatial_gate, identity, out)
        if in_place:
            ctx.mark_dirty(x)
        ctx.fn, ctx.params = fn, params
        ctx.channel_params = len(list(block.ChannelGate.parameters()))
        ctx.save_for_backward(x if fn is None else source, scale, shift, gate, spatial_gate,
                              max_index, pool_index)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        kept, scale, shift, gate, spatial_gate, max_index, pool_index = ctx.saved_tensors
        x = kept if ctx.fn is None else Restore(kept, ctx.fn)()
        grad = grad.contiguous()
        ops = torch.ops.mmattn

        grad_gate, grad_spatial = ops.cbam_gate_grads(grad, x, scale, shift, gate, spatial_gate)
        if ctx.graphs is None:
            weights, mean, peak, pooled = ctx.gate_inputs
            grad_pooled, *spatial_grads = ops.cbam_spatial_gate_backward(
                grad_spatial, pooled, *weights[4:])
            grad_gate = grad_gate + ops.cbam_pool_channel_grad(x, scale, shift, grad_pooled,
                                                               pool_index)
            grad_mean, grad_peak, *channel_grads = ops.cbam_channel_gate_backward(
                grad_gate, mean, peak, *weights[:4])
            # conv weight, BN weight and bias (the running statistics get none)
            found = {id(w): g for w, g in zip((*weights[:4], weights[4], *weights[7:9]),
                                              (*channel_grads, *spatial_grads), strict=True)
                     if w is not None}
            grad_params = [found[id(p)].view_as(p) if p.requires_grad else None
                           for p in ctx.params]
        else:
            channel, leaves, spatial, pooled = ctx.graphs
            channel_params = ctx.params[:ctx.channel_params]
            spatial_params = ctx.params[ctx.channel_params:]
            with _native_convolution():
                grad_pooled, *grad_spatial_params = _grads(spatial, [pooled, *spatial_params],
                                                           grad_spatial)
            grad_gate = grad_gate + ops.cbam_pool_channel_grad(x, scale, shift, grad_pooled,
                                                               pool_index)
            grad_mean, grad_peak, *grad_channel_params = _grads(
                channel, [*leaves, *channel_params], grad_gate)
            grad_params = [*grad_channel_params, *grad_spatial_params]

        grad_x, grad_scale, grad_shift = ops.cbam_input_grad(
            grad, x if scale is not None else None, scale, gate, spatial_gate, grad_pooled,
            pool_index, grad_mean, grad_peak, max_index)
        grads = [g if need else None for g, need in zip(
            (grad_x, grad_scale, grad_shift, grad), ctx.needs_input_grad[1:5], strict=True)]
        return (None, *grads, None, None, *grad_params)


@contextlib.contextmanager
def _native_convolution() -> Iterator[None]:
    """torch's own CPU convolution for the spatial gate's 2 -> 1 channel 7x7 conv, which runs
    it (forward and backward) about twice as fast as oneDNN at ResNet's map sizes.

    The switch itself, not ``torch.backends.mkldnn.flags``, which also sets TF32 and warns.
    """
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def _grads(output: torch.Tensor, inputs: list[torch.Tensor],
           grad: torch.Tensor) -> list[torch.Tensor | None]:
    """d output / d inputs for the upstream ``grad``, contiguous; None for an input that does
    not require grad (a frozen parameter)."""
    wanted = [t for t in inputs if t.requires_grad]
    # retain_graph: the graphs are small and freed with the node; keeping them lets a caller
    # run backward twice (retain_graph=True outside, as gradcheck does).
    found = iter(torch.autograd.grad(output, wanted, grad, retain_graph=True, allow_unused=True))
    grads = [next(found) if t.requires_grad else None for t in inputs]
    return [g.contiguous() if g is not None else None for g in grads]
