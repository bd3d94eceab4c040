"""Global Second-order Pooling (GSoP-Net1 block)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from .. import kernels
from ._common import Restore, fp32_region, gated_residual, stat_dtype

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
    ``mmattn.blocks._common``). Without autograd on the CPU, a frozen bn3 is
    folded into two kernel passes (:mod:`mmattn.kernels`): the rectified,
    subsampled input, and the gated residual add.

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
        """Whether :meth:`fused_norm_residual` takes these tensors: in channel mode, without
        autograd, where the CPU kernels do."""
        return (self.mode == 'channel' and not torch.is_grad_enabled()
                and kernels.usable(src, identity))

    def fused_norm_residual(self, src: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                            identity: torch.Tensor) -> torch.Tensor:
        """``identity + self(src * scale + shift)``, a frozen bn3 folded in, written over
        ``src``, for tensors :meth:`folds_norm` accepts: the rectified, subsampled input in one
        pass, and ``src * (gate * scale) + gate * shift + identity`` in another (without the
        fold: bn3's pass, the ReLU's and the gated add)."""
        ops = torch.ops.mmattn
        rectified = ops.channel_affine_relu(src, scale, shift, self.dr_stride)
        gate = self._channel_attention(rectified).flatten(1)
        a, b = (gate * scale).to(src.dtype), (gate * shift).to(src.dtype)
        ops.channel_affine_residual(src, a, b, identity, src)
        return src

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
        reduced = self.conv_for_DR(rectified)
        with fp32_region(reduced):
            reduced = F.relu(self._normalise(self.bn_for_DR, reduced.to(stat_dtype(reduced))))
            n, d, h, w = reduced.shape
            flat = reduced.reshape(n, d, h * w)
            centred = flat - flat.mean(dim=2, keepdim=True)
            cov = torch.bmm(centred, centred.transpose(1, 2)).div_(h * w)
            rows = _row_wise(self.row_conv_group, self.row_bn(cov.unsqueeze(3)).squeeze(3))
            return torch.sigmoid(_pointwise(self.fc_adapt_channels, rows))[:, :, None, None]

    def _position_attention(self, rectified: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) rectified input -> (N, 1, H, W) fp32 gate."""
        reduced = self.conv_for_DR_spatial(rectified)
        with fp32_region(reduced):
            reduced = self._normalise(self.bn_for_DR_spatial, reduced.to(stat_dtype(reduced)))
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

    def _normalise(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if norm.training and isinstance(norm, nn.BatchNorm2d) and n * h * w == 1:
            raise ValueError(
                f'{type(self).__name__}: BatchNorm after the dimension reduction is in '
                f'training mode but sees one value per channel (batch {n}, {h}x{w} map '
                'after the reduction); train with the backbone\'s norm_eval=True '
                '(frozen BN), SyncBN over several GPUs, or at least 2 images per batch.')
        return norm(x)


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
