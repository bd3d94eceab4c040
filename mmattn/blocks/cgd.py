"""Compact Global Descriptor."""
import torch
import torch.nn as nn
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch.autograd.function import once_differentiable

from .. import kernels
from ._channel_gate import PooledGateMixin, gate_inplace

_MODES = ('cascade', 'plain')


@MODELS.register_module()
class CompactGlobalDescriptor(PooledGateMixin, BaseModule):
    """Compact Global Descriptor (CGD) channel gate.

    Paper: "Compact Global Descriptor for Neural Networks",
    https://arxiv.org/abs/1907.09665.

    With a = global average pool (N, C), m = global max pool and
    p = softmax of a over the channels, the cascaded descriptor (the variant
    the authors' README recommends, ``mode='cascade'``) is::

        psi  = tanh(p a^T w0 + bias0)
        phi  = tanh(p m^T w1 + bias1)
        gate = tanh(psi phi^T w2 + bias2)
        out  = x * (1 + gate)

    and the plain descriptor (``mode='plain'``) is
    ``out = x * (1 + tanh(a a^T w0))``, without bias. The C x C products are
    never formed: ``(p a^T) w0 = p (a . w0)``, so the gate costs O(C) per
    sample. The gate lies in (-1, 1), so every channel is scaled by a factor
    in (0, 2). The weights are random at init, so the block is not the
    identity at init.

    ``w0``, ``w1``, ``w2`` (C, 1) and ``bias0``, ``bias1``, ``bias2``
    (1, C, 1, 1) carry the names and shapes of the authors' ImageNet code
    (their attribute ``attention``), so their checkpoints load by renaming
    the ``attention.`` prefix. (Their detection copy builds the C x C form
    and names the same tensors ``squeeze{i}.0.weight`` (C, 1) and
    ``squeeze{i}.0.bias`` (C, 1, 1).) The authors published no plain module;
    its one weight is named ``w0``, as the cascade's weight on the average
    pool. The authors train these weights with weight decay 4e-5 (1e-4
    elsewhere). Pooling, softmax and the gate are computed in fp32 under
    autocast; the output has the input's dtype.

    Placement in the paper: right after the first conv of every residual
    block, before its BN (Bottleneck: conv1 -> CGD -> bn1 -> ReLU), all
    blocks of res2-res5.

    There, :class:`~mmattn.backbones.AttnResNet` calls ``forward_inplace``:
    the scale is applied in place without autograd, and with autograd the
    backward keeps the output (which bn1 keeps anyway) instead of x (see
    ``mmattn.blocks._common``).

    Args:
        in_channels (int): Channels C of the input.
        mode (str): ``'cascade'`` (average and max pooling, three weights and
            biases) or ``'plain'`` (average pooling, one weight).
            Defaults to ``'cascade'``.
        init_cfg (dict, optional): Initialisation config. Defaults to None.

    Shape:
        (N, C, H, W) in, (N, C, H, W) out.
    """

    _abbr_ = 'cgd'

    def __init__(self,
                 in_channels: int,
                 mode: str = 'cascade',
                 init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg)
        if mode not in _MODES:
            raise ValueError(
                f'{type(self).__name__}: mode={mode!r} is not one of {_MODES}; use '
                "mode='cascade' (the authors' recommended descriptor) or mode='plain'.")
        self.in_channels = in_channels
        self.mode = mode
        self.w0 = nn.Parameter(torch.empty(in_channels, 1))
        if mode == 'cascade':
            self.w1 = nn.Parameter(torch.empty(in_channels, 1))
            self.w2 = nn.Parameter(torch.empty(in_channels, 1))
            self.bias0 = nn.Parameter(torch.empty(1, in_channels, 1, 1))
            self.bias1 = nn.Parameter(torch.empty(1, in_channels, 1, 1))
            self.bias2 = nn.Parameter(torch.empty(1, in_channels, 1, 1))
        self._reset_parameters()

    def init_weights(self) -> None:
        super().init_weights()
        if self.init_cfg is None:
            self._reset_parameters()

    def _reset_parameters(self) -> None:
        # The authors' init: Xavier-uniform weights, zero biases.
        for name, param in self.named_parameters(recurse=False):
            if name.startswith('bias'):
                nn.init.zeros_(param)
            else:
                nn.init.xavier_uniform_(param)

    @property
    def pools_max(self) -> bool:
        return self.mode == 'cascade'

    def gate_from_pools(self, mean: torch.Tensor, peak: torch.Tensor | None) -> torch.Tensor:
        """(N, C) spatial means (and maxima) -> the (N, C) scale ``1 + gate``.

        On the CPU kernels' tensors, one op forward and one backward (``mmattn::cgd_gate``):
        a dozen small ops each way otherwise, which cost more than their arithmetic.
        """
        weights = self._gate_weights()
        if kernels.usable(mean, peak, *weights):
            return _KernelGate.apply(mean, peak if self.mode == 'cascade' else None, *weights)
        if self.mode == 'cascade':
            return 1 + self._cascade_gate(mean, peak)
        return 1 + torch.tanh(mean * (mean @ self.w0))

    def _gate_weights(self) -> tuple[torch.Tensor | None, ...]:
        """w0, w1, w2, bias0, bias1, bias2 (None each but w0 in plain mode)."""
        if self.mode == 'cascade':
            return self.w0, self.w1, self.w2, self.bias0, self.bias1, self.bias2
        return self.w0, None, None, None, None, None

    def gate_kernels(self) -> tuple[str, str, tuple[torch.Tensor | None, ...]]:
        """``mmattn::cgd_gate`` and its backward (see ``PooledGateMixin``)."""
        return 'cgd_gate', 'cgd_gate_backward', self._gate_weights()

    def pre_norm_inference_kernel(self) -> tuple[str, tuple[torch.Tensor | None, ...]]:
        """``mmattn::cgd_inference`` (see ``PooledGateMixin``)."""
        return 'cgd_inference', self._gate_weights()

    def forward_inplace(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)`` for a backbone that gives ``x`` up (see ``blocks._channel_gate``).

        At the paper's place the output goes to a BN, which keeps it for backward; this keeps
        that output too, instead of x.
        """
        return gate_inplace(self, x)

    def _cascade_gate(self, mean: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
        c = self.in_channels
        weights = torch.softmax(mean, dim=1)
        psi = torch.tanh(weights * (mean @ self.w0) + self.bias0.view(1, c))
        phi = torch.tanh(weights * (peak @ self.w1) + self.bias1.view(1, c))
        return torch.tanh(psi * (phi @ self.w2) + self.bias2.view(1, c))


class _KernelGate(torch.autograd.Function):
    """CGD's gate through ``mmattn::cgd_gate`` and its backward (one op each way)."""

    @staticmethod
    def forward(ctx, mean: torch.Tensor, peak: torch.Tensor | None,
                *weights: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(mean, peak, *weights)
        return torch.ops.mmattn.cgd_gate(mean, peak, *weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        inputs = ctx.saved_tensors
        grads = torch.ops.mmattn.cgd_gate_backward(grad.contiguous(), *inputs)
        return tuple(g.view_as(t) if t is not None and needed else None
                     for g, t, needed in zip(grads, inputs, ctx.needs_input_grad, strict=True))
