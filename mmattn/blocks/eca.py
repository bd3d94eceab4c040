"""Efficient Channel Attention."""
import math

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from ._channel_gate import MeanGateMixin


def eca_kernel_size(in_channels: int, gamma: float = 2, b: float = 1) -> int:
    """The paper's adaptive kernel size psi(C) = |log2(C) / gamma + b / gamma|_odd.

    Rounded as the paper's own code (its Figure 3) does: truncate to an
    integer, then go up to the next odd number if it is even. With the paper's
    gamma=2, b=1: C = 64 -> 3, 128..1024 -> 5, 2048 -> 7.
    """
    t = int(abs((math.log2(in_channels) + b) / gamma))
    return t if t % 2 else t + 1


@MODELS.register_module()
class EfficientChannelAttention(MeanGateMixin, BaseModule):
    """Efficient Channel Attention (ECA) channel gate.

    Paper: "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural
    Networks", https://arxiv.org/abs/1910.03151.

    y = sigmoid(conv1d_k(avgpool(x))), out = x * y: a 1-D convolution over
    the channel axis of the pooled descriptor (one input and one output
    channel, zero padding (k - 1) / 2, no bias), so each channel's gate sees
    its k neighbours without any dimensionality reduction.

    The convolution is ``conv`` with weight shape (1, 1, k), as in the
    authors' code (``eca.conv.weight``), so their checkpoints load unchanged;
    its init is PyTorch's default, as theirs. The authors' released
    ECA-ResNet-50 fixes k per stage (3, 5, 5, 7) instead of using the adaptive
    rule (5, 5, 5, 7); give mmdet's ``plugins`` one entry per stage with
    ``stages=`` to reproduce it. The pooling, convolution and sigmoid run in
    fp32 under autocast; the output has the input's dtype.

    Placement in the paper: after the last conv + BN of every residual block,
    before the identity is added (mmdet ResNet: ``position='after_conv3'``).
    In :class:`~mmattn.backbones.AttnResNet` the gate is applied inside the
    residual add (``fused_residual``: no new feature map), and backward forms
    the gate's gradient from bn3's input instead of keeping the block's input
    (see ``mmattn.blocks._common`` and ``mmattn.blocks._channel_gate``);
    outputs and gradients are the same.

    Args:
        in_channels (int): Channels C of the input.
        kernel_size (int, optional): Odd size k of the 1-D convolution; None
            takes the paper's adaptive size (gamma=2, b=1; see
            :func:`eca_kernel_size`). Defaults to None.
        init_cfg (dict, optional): Initialisation config. Defaults to None.

    Shape:
        (N, C, H, W) in, (N, C, H, W) out.
    """

    _abbr_ = 'eca'

    def __init__(self,
                 in_channels: int,
                 kernel_size: int | None = None,
                 init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg)
        if kernel_size is None:
            kernel_size = eca_kernel_size(in_channels)
        elif kernel_size < 1 or kernel_size % 2 == 0:
            adaptive = eca_kernel_size(in_channels)
            raise ValueError(
                f'{type(self).__name__}: kernel_size={kernel_size} must be a positive odd '
                'number, so the 1-D convolution keeps all C channels centred; use e.g. '
                f'kernel_size={max(1, kernel_size + 1 - kernel_size % 2)} or kernel_size=None '
                f'(the paper\'s adaptive size, {adaptive} for in_channels={in_channels}).')
        self.in_channels = in_channels
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(
            1, 1, kernel_size=kernel_size, padding=(kernel_size - 1) // 2, bias=False)

    def init_weights(self) -> None:
        super().init_weights()
        if self.init_cfg is None:
            # PyTorch's default Conv1d init, as the reference code uses.
            self.conv.reset_parameters()

    def gate_from_pools(self, mean: torch.Tensor, peak: None = None) -> torch.Tensor:
        """(N, C) spatial means -> the (N, C) gate (see ``blocks._channel_gate``)."""
        return torch.sigmoid(self.conv(mean[:, None]))[:, 0]

    def inference_kernel(self) -> tuple[str, tuple[torch.Tensor, ...]]:
        """``mmattn::eca_inference`` (see ``MeanGateMixin``)."""
        return 'eca_inference', (self.conv.weight, )

    def gate_kernels(self) -> tuple[str, str, tuple[torch.Tensor, ...]]:
        """``mmattn::eca_gate`` and its backward (see ``PooledGateMixin``)."""
        return 'eca_gate', 'eca_gate_backward', (self.conv.weight, )

    def training_kernels(self) -> tuple[str, str, tuple[torch.Tensor, ...]]:
        """``mmattn::eca_norm_residual`` and its backward (see ``MeanGateMixin``)."""
        return 'eca_norm_residual', 'eca_norm_residual_backward', (self.conv.weight, )
