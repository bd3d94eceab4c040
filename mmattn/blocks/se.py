"""Squeeze-and-Excitation."""
import torch
import torch.nn as nn
from mmcv.cnn import build_activation_layer
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from ._channel_gate import MeanGateMixin
from ._common import reduced_channels


@MODELS.register_module()
class SqueezeExcitation(MeanGateMixin, BaseModule):
    """Squeeze-and-Excitation (SE) channel gate.

    Paper: "Squeeze-and-Excitation Networks", https://arxiv.org/abs/1709.01507.

    y = gate(fc2(act(fc1(avgpool(x))))), out = x * y. The two fully connected
    layers are ``nn.Linear`` named ``fc.0`` and ``fc.2``, as in PytorchInsight
    (the SGE paper's comparison code), so its SE-ResNet checkpoints load with
    the same keys (``se.fc.0.weight`` ...). The spatial mean is taken in fp32
    under autocast; the output has the input's dtype.

    Placement in the paper: after the last conv + BN of every residual block,
    before the identity is added (mmdet ResNet: ``position='after_conv3'``).
    In :class:`~mmattn.backbones.AttnResNet` the gate is applied inside the
    residual add (``fused_residual``: no new feature map), and backward forms
    the gate's gradient from bn3's input instead of keeping the block's input
    (see ``mmattn.blocks._common`` and ``mmattn.blocks._channel_gate``);
    outputs and gradients are the same.

    Args:
        in_channels (int): Channels C of the input.
        rd_ratio (float): Hidden width as a fraction of C. Defaults to 1 / 16.
        act_cfg (dict): Activation between the two layers.
            Defaults to ``dict(type='ReLU')``.
        gate_cfg (dict): Gate activation. Defaults to ``dict(type='Sigmoid')``.
        init_cfg (dict, optional): Initialisation config. Defaults to None.

    Shape:
        (N, C, H, W) in, (N, C, H, W) out.
    """

    _abbr_ = 'se'

    def __init__(self,
                 in_channels: int,
                 rd_ratio: float = 1 / 16,
                 act_cfg: dict = dict(type='ReLU'),
                 gate_cfg: dict = dict(type='Sigmoid'),
                 init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg)
        hidden = reduced_channels(self, in_channels, rd_ratio)
        self.in_channels = in_channels
        self.fc = nn.Sequential(
            nn.Linear(in_channels, hidden),
            build_activation_layer(act_cfg),
            nn.Linear(hidden, in_channels))
        self.gate = build_activation_layer(gate_cfg)

    def init_weights(self) -> None:
        super().init_weights()
        if self.init_cfg is None:
            # PyTorch's default Linear init, as the reference code uses.
            for layer in (self.fc[0], self.fc[2]):
                layer.reset_parameters()

    def gate_from_pools(self, mean: torch.Tensor, peak: None = None) -> torch.Tensor:
        """(N, C) spatial means -> the (N, C) gate (see ``blocks._channel_gate``)."""
        # A model cast to half without autocast has half weights: meet them in their dtype.
        return self.gate(self.fc(mean.to(self.fc[0].weight.dtype)))

    def inference_kernel(self) -> tuple[str, tuple[torch.Tensor, ...]] | None:
        """``mmattn::se_inference`` for the default ReLU and sigmoid (see ``MeanGateMixin``)."""
        weights = self._kernel_weights()
        return None if weights is None else ('se_inference', weights)

    def gate_kernels(self) -> tuple[str, str, tuple[torch.Tensor, ...]] | None:
        """``mmattn::se_gate`` and its backward, for the default ReLU and sigmoid (see
        ``PooledGateMixin``)."""
        weights = self._kernel_weights()
        return None if weights is None else ('se_gate', 'se_gate_backward', weights)

    def training_kernels(self) -> tuple[str, str, tuple[torch.Tensor, ...]] | None:
        """``mmattn::se_norm_residual`` and its backward, for the default ReLU and sigmoid (see
        ``MeanGateMixin``)."""
        weights = self._kernel_weights()
        return None if weights is None else ('se_norm_residual', 'se_norm_residual_backward',
                                             weights)

    def _kernel_weights(self) -> tuple[torch.Tensor, ...] | None:
        """The MLP's weights and biases, where the kernels have this SE's activations."""
        squeeze, act, excite = self.fc
        if type(act) is not nn.ReLU or type(self.gate) is not nn.Sigmoid:
            return None
        return squeeze.weight, squeeze.bias, excite.weight, excite.bias
