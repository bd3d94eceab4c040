"""Global Second-order Pooling (GSoP-Net1 block)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch.autograd.function import once_differentiable

from .. import kernels
from ._common import (
    Restore,
    affine_residual,
    channel_affine,
    check_batch_statistics,
    fp32_region,
    frozen_affine,
    gated_residual,
    grad_sums,
    has_hooks,
    is_pointwise_gemm,
    needs_grad,
    pointwise_matmul,
    stat_dtype,
)

# The authors' fusion modes, by our name: '1', '2', '+' and 'M' in their code.
_MODES = ('channel', 'position', 'sum', 'max')
# Side of the grid the position branch pools to (the authors' sp_h = sp_w = 8).
_GRID = 8


@MODELS.register_module()
class GlobalSecondOrderPooling(BaseModule):
    """Global Second-order Pooling (GSoP) attention, the GSoP-Net1 block.

    Paper: "Global Second-order Pooling Convolutional Networks" (CVPR 2019),
    https://arxiv.org/abs/1811.12006.

    Channel attention (``mode='channel'``, the paper's default): ReLU, a 1x1
    conv to ``att_dim`` channels (``conv_for_DR``, stride ``dr_stride``), BN,
    ReLU; the ``att_dim`` x ``att_dim`` covariance over the M positions,
    Sigma = X Ibar X^T with Ibar = I / M - 1 1^T / M^2 (population
    normalisation); BN over its rows (``row_bn``); a row-wise conv, 4 outputs
    per row (``row_conv_group``); a 1x1 conv back to C (``fc_adapt_channels``)
    and a sigmoid: out = x * att, att of shape (N, C, 1, 1). As in the authors'
    code there is no activation between the row-wise conv and the 1x1 conv.

    Position attention (``mode='position'``): ReLU, 1x1 conv to ``att_dim``
    channels, BN (no ReLU), adaptive average pooling to 8 x 8, a 64 x 64
    matrix between the positions, BN over its rows, a row-wise conv (4 per
    row), ReLU, a 1x1 conv to 64 and a sigmoid, reshaped to (N, 1, 8, 8) and
    average-pooled back to H x W: out = relu(x * att). The 64 x 64 matrix is
    the authors' ``cov_feature``: X^T Ibar X over the ``att_dim`` channels, but
    with Ibar built from M = 64 (the number of positions), i.e.
    (X^T X - s s^T / 64) / 64 with s the per-position channel sum. That is not
    the centred covariance over the channels; it is kept because trained
    position weights expect it. ``mode='sum'`` adds the channel and position
    outputs, ``mode='max'`` takes their element-wise maximum (the authors'
    concatenation mode '&' is not provided).

    The authors' parameter names are kept directly on the block
    (``conv_for_DR``, ``bn_for_DR``, ``row_bn``, ``row_conv_group``,
    ``fc_adapt_channels``; position branch: ``conv_for_DR_spatial``,
    ``bn_for_DR_spatial``, ``row_bn_for_spatial``,
    ``row_conv_group_for_spatial``, ``fc_adapt_channels_for_spatial``). Their
    checkpoints hold them on the Bottleneck itself (``layer1.2.row_bn.weight``);
    here they sit under the plugin name (``layer1.2.gsop.row_bn.weight``).

    Everything after the dimension-reduction conv (BN, covariance, row-wise
    conv, gate) runs in fp32 under autocast; the output has the input's dtype.
    A single position (H' x W' = 1) has covariance 0, and an all-zero input
    gives finite outputs and gradients. In training mode ``bn_for_DR`` needs
    more than one value per channel: batch 1 with a 1 x 1 map after the
    reduction raises a ValueError (freeze BN with ``norm_eval=True``, as
    detectors do, or use SyncBN / a larger batch).

    Placement in the paper: the LAST Bottleneck of each stage only (4 blocks in
    ResNet-50), after conv3 + bn3, before the identity is added (mmdet ResNet:
    ``position='after_conv3'``, restricted to the last block). GSoP-Net1 also
    runs stage 4 at stride 1 on ImageNet; detection backbones keep the standard
    strides.

    In :class:`~mmattn.backbones.AttnResNet` the channel gate is applied inside
    the residual add (``fused_residual``), and backward forms the gate's
    gradient from bn3's input instead of keeping the block's input (see
    ``mmattn.blocks._common``). A frozen bn3 (mmdet's ``norm_eval=True``) is
    folded into the block (``fused_norm_residual``): two passes over bn3's
    input, the rectified, subsampled input and the gated residual add (CPU
    kernels where they take the tensors, :mod:`mmattn.kernels`), and in
    training one autograd node that writes bn3's input gradient in one pass. On the
    CPU ``conv_for_DR`` runs as a matrix product, with a frozen ``bn_for_DR`` folded into it.

    Args:
        in_channels (int): Channels C of the input.
        mode (str): ``'channel'``, ``'position'``, ``'sum'`` or ``'max'``.
            Defaults to ``'channel'``.
        att_dim (int): Channels after the dimension reduction, the size of the
            channel covariance. Defaults to 128.
        dr_stride (int, optional): Stride of the channel branch's reduction
            conv. None applies the authors' rule for a Bottleneck's output,
            stride 2 when ``in_channels <= 256`` (planes <= 64, stage 1) and 1
            otherwise; pass it explicitly for other blocks. Defaults to None.
        init_cfg (dict, optional): Initialisation config. Defaults to None.

    Shape:
        (N, C, H, W) in, (N, C, H, W) out.
    """

    _abbr_ = 'gsop'

    def __init__(self,
                 in_channels: int,
                 mode: str = 'channel',
                 att_dim: int = 128,
                 dr_stride: int | None = None,
                 init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg)
        name = type(self).__name__
        if mode not in _MODES:
            raise ValueError(f'{name}: mode={mode!r} is not supported; choose one of '
                             f'{", ".join(map(repr, _MODES))} (default \'channel\').')
        if att_dim < 1:
            raise ValueError(f'{name}: att_dim={att_dim} must be a positive channel '
                             'count, e.g. att_dim=128 as in GSoP-Net1.')
        if dr_stride is None:
            dr_stride = 2 if in_channels <= 256 else 1
        elif dr_stride < 1:
            raise ValueError(f'{name}: dr_stride={dr_stride} must be a positive integer, '
                             'or None for the authors\' rule (2 for in_channels <= 256, '
                             'else 1).')
        self.in_channels = in_channels
        self.mode = mode
        self.att_dim = att_dim
        self.dr_stride = dr_stride
        if mode != 'position':
            # Stride 1 here: forward() subsamples before the ReLU, which gives the
            # same result as a strided 1x1 conv while rectifying a quarter of x.
            self.conv_for_DR = nn.Conv2d(in_channels, att_dim, 1)
            self.bn_for_DR = nn.BatchNorm2d(att_dim)
            self.row_bn = nn.BatchNorm2d(att_dim)
            self.row_conv_group = nn.Conv2d(
                att_dim, 4 * att_dim, (att_dim, 1), groups=att_dim)
            self.fc_adapt_channels = nn.Conv2d(4 * att_dim, in_channels, 1)
        if mode != 'channel':
            cells = _GRID * _GRID
            self.conv_for_DR_spatial = nn.Conv2d(in_channels, att_dim, 1)
            self.bn_for_DR_spatial = nn.BatchNorm2d(att_dim)
            self.row_bn_for_spatial = nn.BatchNorm2d(cells)
            self.row_conv_group_for_spatial = nn.Conv2d(
                cells, 4 * cells, (cells, 1), groups=cells)
            self.fc_adapt_channels_for_spatial = nn.Conv2d(4 * cells, cells, 1)

    def init_weights(self) -> None:
        super().init_weights()
        if self.init_cfg is not None:
            return
        # The authors' init: conv weights Kaiming normal (fan_out, ReLU), conv
        # biases PyTorch's default uniform, BN weight 1 and bias 0.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
                bound = 1 / math.sqrt(module.weight[0].numel())
                nn.init.uniform_(module.bias, -bound, bound)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.dr_stride
        if self.mode == 'channel':
            return x * self._channel_attention(F.relu(x[:, :, ::s, ::s])).to(x.dtype)
        return self._position_modes(x)

    def fused_residual(self, x: torch.Tensor, identity: torch.Tensor,
                       restore: Restore | None = None) -> torch.Tensor:
        """``identity + self(x)`` for a backbone that gives ``x`` up (see ``blocks._common``).

        The channel gate is applied inside the add; the other modes add their output.
        """
        if self.mode != 'channel':
            return self._position_modes(x).add_(identity)
        s = self.dr_stride
        gate = self._channel_attention(F.relu(x[:, :, ::s, ::s]))
        return gated_residual(x, gate, identity, restore)

    def folds_norm(self, src: torch.Tensor, identity: torch.Tensor) -> bool:
        """Whether :meth:`fused_norm_residual` takes these tensors: in channel mode, with
        autograd in full precision (bn3's pass and backward join the block's node), and
        without where the CPU kernels do."""
        if self.mode != 'channel':
            return False
        if torch.is_grad_enabled():
            return src.dtype == stat_dtype(src)
        return kernels.usable(src, identity)

    def fused_norm_residual(self, src: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                            identity: torch.Tensor) -> torch.Tensor:
        """``identity + self(src * scale + shift)``, a frozen bn3 folded in, for tensors
        :meth:`folds_norm` accepts: the rectified, subsampled input in one pass, and
        ``src * (gate * scale) + gate * shift + identity`` in another (without the fold: bn3's
        pass, the ReLU's and the gated add). With autograd it is one node
        (:class:`_FoldedChannelGSoP`) that keeps ``src``, as bn3 would; without, it is written
        over ``src``."""
        params = [p for p in self.parameters() if p.requires_grad]
        if needs_grad(src, scale, shift, identity, *params):
            return _FoldedChannelGSoP.apply(self, src, scale, shift, identity, *params)
        rectified = _affine_rectified(src, scale, shift, self.dr_stride)
        gate = self._channel_attention(rectified).flatten(1)
        a, b = (gate * scale).to(src.dtype), (gate * shift).to(src.dtype)
        if kernels.usable(src, a, b, identity):
            torch.ops.mmattn.channel_affine_residual(src, a, b, identity, src)
            return src
        return src.mul_(a[:, :, None, None]).add_(b[:, :, None, None]).add_(identity)

    def _position_modes(self, x: torch.Tensor) -> torch.Tensor:
        """forward() of the position, sum and max modes."""
        s = self.dr_stride
        rectified = F.relu(x)
        # relu(x * att) == relu(x) * att because att >= 0.
        position = rectified * self._position_attention(rectified).to(x.dtype)
        if self.mode == 'position':
            return position
        channel = self._channel_attention(rectified[:, :, ::s, ::s]).to(x.dtype)
        if self.mode == 'sum':
            return position.addcmul_(x, channel)
        return torch.maximum(x * channel, position)

    def _channel_attention(self, rectified: torch.Tensor) -> torch.Tensor:
        """(N, C, H', W') rectified, subsampled input -> (N, C, 1, 1) fp32 gate."""
        reduced = self._reduction(rectified)
        with fp32_region(reduced):
            n, d, h, w = reduced.shape
            cov = _rectified_covariance(reduced.reshape(n, d, h * w))
            rows = _row_wise(self.row_conv_group, self.row_bn(cov.unsqueeze(3)).squeeze(3))
            return torch.sigmoid(_pointwise(self.fc_adapt_channels, rows))[:, :, None, None]

    def _reduction(self, rectified: torch.Tensor) -> torch.Tensor:
        """``bn_for_DR(conv_for_DR(rectified))``, a new tensor in the statistics dtype (the
        ReLU after it is :func:`_rectified_covariance`'s).

        On the CPU the 1x1 conv is a matrix product (:func:`~._common.pointwise_conv`), and a
        frozen ``bn_for_DR`` (running statistics, as ``norm_eval=True`` keeps it) is folded into
        the product's weight and bias: no pass of the BN over the reduced map (the same map to
        rounding; the BN's weight and bias still train). Hooks on either layer keep both
        layers' calls.
        """
        conv = self.conv_for_DR
        gemm = is_pointwise_gemm(conv, rectified)
        affine = frozen_affine(self.bn_for_DR) if gemm else None
        if affine is None:
            reduced = (pointwise_matmul(rectified, conv.weight.flatten(1), conv.bias) if gemm
                       else conv(rectified))
            with fp32_region(reduced):
                normed = self._normalise('bn_for_DR', reduced.to(stat_dtype(reduced)))
            # A hook may keep the BN's output, which the covariance overwrites without autograd.
            return normed.clone() if has_hooks(self.bn_for_DR) else normed
        scale, shift = (t.to(conv.weight.dtype) for t in affine)
        bias = shift if conv.bias is None else torch.addcmul(shift, conv.bias, scale)
        return pointwise_matmul(rectified, conv.weight.flatten(1) * scale[:, None], bias)

    def _position_attention(self, rectified: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) rectified input -> (N, 1, H, W) fp32 gate."""
        reduced = self.conv_for_DR_spatial(rectified)
        with fp32_region(reduced):
            reduced = self._normalise('bn_for_DR_spatial', reduced.to(stat_dtype(reduced)))
            grid = F.adaptive_avg_pool2d(reduced, _GRID).flatten(2)
            cells = _GRID * _GRID
            # The authors' cov_feature: X^T (I / M - 1 1^T / M^2) X with M = 64
            # positions, though the identity spans the att_dim channels.
            shifted = grid - grid.sum(dim=1, keepdim=True) / cells
            gram = torch.bmm(grid.transpose(1, 2), shifted).div_(cells)
            rows = F.relu(_row_wise(self.row_conv_group_for_spatial,
                                    self.row_bn_for_spatial(gram.unsqueeze(3)).squeeze(3)))
            att = torch.sigmoid(_pointwise(self.fc_adapt_channels_for_spatial, rows))
            att = att.view(-1, 1, _GRID, _GRID)
            return F.adaptive_avg_pool2d(att, rectified.shape[2:])

    def _normalise(self, name: str, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        check_batch_statistics(self, name, n * h * w,
                               f'batch {n}, {h}x{w} map after the reduction')
        return getattr(self, name)(x)


def _rectified_covariance(reduced: torch.Tensor) -> torch.Tensor:
    """(N, d, M) -> (N, d, d): the covariance over the M positions of X = relu(reduced),
    X Ibar X^T, as X centred over the positions times its transpose, over M.

    ``reduced`` is the caller's own: without autograd it is rectified and centred in place; with
    autograd :class:`_RectifiedCovariance` keeps one map for backward where the ReLU, the
    centring and the product would keep two.
    """
    if needs_grad(reduced):
        return _RectifiedCovariance.apply(reduced)
    return _centred_covariance_(reduced.relu_())


def _centred_covariance_(x: torch.Tensor) -> torch.Tensor:
    """Centres the (N, d, M) ``x`` over its M positions in place and returns x x^T / M."""
    x.sub_(x.mean(dim=2, keepdim=True))
    return torch.bmm(x, x.transpose(1, 2)).div_(x.shape[2])


class _RectifiedCovariance(torch.autograd.Function):
    """cov = Xc Xc^T / M for Xc = relu(reduced) centred over the M positions, as one node.

    Backward is one product, grad_Xc = (grad + grad^T) Xc / M, where autograd runs one per
    factor; the centring's backward then subtracts its mean over the positions. That mean is
    (grad + grad^T) times Xc's row sums over M, zero but for rounding, and subtracting it keeps
    the sums of the gradient (a bias's, a BN's) as accurate as autograd's. The ReLU's mask is
    kept as booleans.
    """

    @staticmethod
    def forward(ctx, reduced: torch.Tensor) -> torch.Tensor:
        positive = reduced > 0
        centred = torch.relu(reduced)
        cov = _centred_covariance_(centred)
        ctx.save_for_backward(centred, positive)
        return cov

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        centred, positive = ctx.saved_tensors
        grad_centred = torch.bmm(grad + grad.transpose(1, 2), centred).div_(centred.shape[2])
        grad_centred.sub_(grad_centred.mean(dim=2, keepdim=True))
        return grad_centred.mul_(positive)


def _affine_rectified(src: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                      stride: int) -> torch.Tensor:
    """``relu(src * scale + shift)`` with (C, ) ``scale`` and ``shift``, subsampled by
    ``stride``: one pass over a quarter of ``src`` (stride 2) through the CPU kernel."""
    if kernels.usable(src, scale, shift):
        return torch.ops.mmattn.channel_affine_relu(src, scale, shift, stride)
    sub = src[:, :, ::stride, ::stride]
    return F.relu(sub * scale.view(-1, 1, 1).to(src.dtype) + shift.view(-1, 1, 1).to(src.dtype))


class _FoldedChannelGSoP(torch.autograd.Function):
    """out = identity + x * gate(relu(x subsampled)) for x = src * scale + shift, a frozen bn3
    before the channel-mode block, as one autograd node.

    Forward makes two passes over ``src`` (the rectified, subsampled input; the output), and
    records the gate's own graph, from the rectified input (a leaf) and the block's parameters,
    to be differentiated with :func:`torch.autograd.grad` in backward. Backward keeps ``src``
    (which bn3 keeps anyway) and writes ``src``'s gradient in one pass plus, on the subsampled
    positions, the rectified input's share; in the unfused network autograd writes those as
    separate feature maps (the gated add's, the ReLU's, the subsampling's zeros, bn3's) and
    adds them.
    """

    @staticmethod
    def forward(ctx, block: GlobalSecondOrderPooling, src: torch.Tensor, scale: torch.Tensor,
                shift: torch.Tensor, identity: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        s, t = scale.to(src.dtype), shift.to(src.dtype)
        rectified = _affine_rectified(src, s, t, block.dr_stride).requires_grad_()
        with torch.enable_grad():
            gate = block._channel_attention(rectified).flatten(1)
        g = gate.detach()
        ctx.stride, ctx.dtypes = block.dr_stride, (scale.dtype, shift.dtype)
        ctx.gate, ctx.rectified, ctx.params = gate, rectified, params
        ctx.save_for_backward(src, g, s, t)
        return affine_residual(src, (g * s).to(src.dtype), (g * t).to(src.dtype), identity)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        src, g, s, t = ctx.saved_tensors
        # Through the gated add, out = identity + g * (src * s + t).
        by_src, by_one = grad_sums(grad, src, with_grad_sum=True)
        grad_gate = by_src * s + by_one * t
        grad_s, grad_t = (g * by_src).sum(0), (g * by_one).sum(0)
        # Through the gate, to the rectified input and the block's parameters. retain_graph:
        # a caller may run backward twice (retain_graph=True outside, as gradcheck does).
        grad_rectified, *grad_params = torch.autograd.grad(
            ctx.gate, [ctx.rectified, *ctx.params], grad_gate.to(ctx.gate.dtype),
            retain_graph=True, allow_unused=True)
        # Through the ReLU and the subsampled affine map, rectified = relu(sub * s + t).
        rectified = ctx.rectified.detach()
        grad_sub = torch.ops.aten.threshold_backward(grad_rectified.to(grad.dtype), rectified, 0)
        sub = src[:, :, ::ctx.stride, ::ctx.stride]
        by_sub, by_sub_one = grad_sums(grad_sub, sub, with_grad_sum=True)
        grad_s, grad_t = grad_s + by_sub.sum(0), grad_t + by_sub_one.sum(0)

        grad_src = None
        if ctx.needs_input_grad[1]:
            factor = (g * s).to(grad.dtype)
            grad_src = channel_affine(grad, factor, torch.zeros_like(factor))
            grad_src[:, :, ::ctx.stride, ::ctx.stride].addcmul_(grad_sub, s.view(-1, 1, 1))
        grad_scale = grad_s.to(ctx.dtypes[0]) if ctx.needs_input_grad[2] else None
        grad_shift = grad_t.to(ctx.dtypes[1]) if ctx.needs_input_grad[3] else None
        grad_identity = grad if ctx.needs_input_grad[4] else None
        return (None, grad_src, grad_scale, grad_shift, grad_identity, *grad_params)


def _row_wise(conv: nn.Conv2d, rows: torch.Tensor) -> torch.Tensor:
    """``conv(rows.unsqueeze(3)).flatten(1)`` for the authors' row-wise conv, (N, d, d) -> (N, k d).

    That conv has one group per row and a kernel spanning the row, so output ``i k + j`` is the
    dot product of row ``i`` with filter ``j`` of that row. Written as a broadcast product and a
    sum: the same arithmetic, but oneDNN's grouped convolution runs it about 10x slower forward
    and 4x slower forward + backward (0.3 ms against 0.03 ms forward, batch 4, d = 128).
    """
    n, d, _ = rows.shape
    filters = conv.weight.view(d, -1, d)
    return (rows.unsqueeze(2) * filters).sum(3).reshape(n, -1) + conv.bias


def _pointwise(conv: nn.Conv2d, features: torch.Tensor) -> torch.Tensor:
    """``conv(features[:, :, None, None]).flatten(1)`` for a 1x1 conv on a 1x1 map: a matrix
    product, 2-3x faster than the convolution call on the CPU."""
    return F.linear(features, conv.weight.flatten(1), conv.bias)
