"""Spatial Group-wise Enhance."""
from collections.abc import Callable

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch.autograd.function import once_differentiable

from .. import kernels
from ._common import (
    Restore,
    check_divisible,
    fp32_region,
    grouped,
    multiply_add_,
    needs_grad,
    stat_dtype,
)


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

    A custom autograd function keeps only x (or, fused in
    :class:`~mmattn.backbones.AttnResNet`, what recomputes x from bn3's input)
    and per-group statistics for backward, and recomputes the scores there;
    in AttnResNet the gate is applied inside the residual add
    (``fused_residual``, see ``mmattn.blocks._common``). On the CPU, float32
    and float64 tensors go through fused kernels (:mod:`mmattn.kernels`) that
    work on one group of one sample at a time while it stays in cache; in
    inference they fold a frozen bn3 into that pass (``fused_norm_residual``).

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
        return _spatial_group_enhance(self, x, None, None)

    def fused_residual(self, x: torch.Tensor, identity: torch.Tensor,
                       restore: Restore | None = None) -> torch.Tensor:
        """``identity + self(x)`` for a backbone that gives ``x`` up (see ``blocks._common``)."""
        return _spatial_group_enhance(self, x, identity, restore)

    def folds_norm(self, src: torch.Tensor, identity: torch.Tensor) -> bool:
        """Whether :meth:`fused_norm_residual` takes these tensors: without autograd, through
        the CPU kernel (with autograd the BN runs, and backward recomputes its output from src,
        see ``fused_residual``)."""
        return not torch.is_grad_enabled() and kernels.usable(src, identity, *self.parameters())

    def fused_norm_residual(self, src: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                            identity: torch.Tensor) -> torch.Tensor:
        """``identity + self(src * scale + shift)`` written over ``src``: a frozen BN before the
        block folded in, for tensors :meth:`folds_norm` accepts. The kernel computes the BN's
        output one slab at a time where it reads it, so the BN's own pass disappears."""
        scale, shift = scale.contiguous(), shift.contiguous()
        if (needs_grad(src, scale, shift, identity, self.weight, self.bias)
                or not kernels.usable(src, identity, scale, shift, self.weight, self.bias)):
            x = src * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
            return _spatial_group_enhance(self, x, identity, None)
        torch.ops.mmattn.sge_forward(src, self.weight, self.bias, identity, src, self.groups,
                                     self.eps, scale, shift)
        return src


def _spatial_group_enhance(block: SpatialGroupEnhance, x: torch.Tensor,
                           identity: torch.Tensor | None,
                           restore: Restore | None) -> torch.Tensor:
    """``x * gate`` (plus ``identity``, written over x when autograd does not need x)."""
    if needs_grad(x, block.weight, block.bias, identity):
        source, fn = (restore.source, restore.fn) if restore is not None else (None, None)
        return _GroupEnhance.apply(x, block.weight, block.bias, identity, source, fn,
                                   block.groups, block.eps)
    if kernels.usable(x, identity, block.weight, block.bias):
        out = torch.empty_like(x) if identity is None else x
        torch.ops.mmattn.sge_forward(x, block.weight, block.bias, identity, out, block.groups,
                                     block.eps)
        return out
    with fp32_region(x):
        gate = _gate(_grouped(x, block.groups), block.weight, block.bias, block.eps)[0]
    gate = _per_position(gate.to(x.dtype), x)
    if identity is None:
        return (grouped(x, gate) * gate).flatten(1, 2)
    return multiply_add_(x, gate, identity)


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, G, C / G, H * W), a view where the strides allow."""
    return x.unflatten(1, (groups, -1)).flatten(3)


def _per_position(gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The (N, G, 1, HW) gate as (N, G, 1, H, W), which broadcasts against grouped x."""
    return gate.unflatten(3, x.shape[2:])


def _gate(xg: torch.Tensor, weight: torch.Tensor,
          bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor, torch.Tensor]:
    """The fp32 gate (N, G, 1, HW) of grouped x, with the centres, centred scores, and the
    scores' means and stds."""
    xf = xg.to(stat_dtype(xg))
    centre = xf.mean(dim=3, keepdim=True)
    # (N, G, 1, HW): each position's dot product with its group mean.
    score = torch.matmul(centre.transpose(2, 3), xf)
    mean = score.mean(dim=3, keepdim=True)
    score = score.sub_(mean)
    # The unbiased std as a norm (torch.var_mean is many times slower on the CPU); a lone
    # position has spread 0, so its normalised score is 0.
    std = torch.linalg.vector_norm(score, dim=3, keepdim=True) / max(xg.shape[3] - 1, 1) ** 0.5
    return _activate(score, std, weight, bias, eps), centre, score, mean, std


def _activate(centred: torch.Tensor, std: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor, eps: float) -> torch.Tensor:
    """sigmoid(centred / (std + eps) * weight + bias), as one multiply-add per position."""
    groups = centred.shape[1]
    scale = weight.to(centred.dtype).view(1, groups, 1, 1) / (std + eps)
    return torch.addcmul(bias.to(centred.dtype).view(1, groups, 1, 1), centred,
                         scale).sigmoid_()


class _GroupEnhance(torch.autograd.Function):
    """SGE's ``x * gate`` (+ identity) whose backward keeps x, or what restores it, and the
    per-group centres and the scores' means and stds; scores and gate are recomputed from x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                identity: torch.Tensor | None, source: torch.Tensor | None,
                fn: Callable[[torch.Tensor], torch.Tensor] | None, groups: int,
                eps: float) -> torch.Tensor:
        ctx.fn, ctx.groups, ctx.eps = fn, groups, eps
        kept = x if fn is None else source
        # x is overwritten when it can be recomputed and there is an identity to add.
        in_place = fn is not None and identity is not None
        out = x if in_place else torch.empty_like(x)
        ctx.kernel = kernels.usable(x, identity, weight, bias)
        if ctx.kernel:
            stats = torch.ops.mmattn.sge_forward(x, weight, bias, identity, out, groups, eps)
            ctx.save_for_backward(kept, weight, bias, *stats)
        else:
            xg = _grouped(x, groups)
            with fp32_region(x):
                gate, centre, _, mean, std = _gate(xg, weight, bias, eps)
            ctx.save_for_backward(kept, weight, bias, centre, mean, std)
            gate = _per_position(gate.to(x.dtype), x)
            torch.mul(grouped(x, gate), gate, out=grouped(out, gate))
            if identity is not None:
                out.add_(identity)
        if in_place:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        kept, weight, bias, centre, mean, std = ctx.saved_tensors
        x = kept if ctx.fn is None else Restore(kept, ctx.fn)()
        groups, eps = ctx.groups, ctx.eps
        grad_identity = grad if ctx.needs_input_grad[3] else None
        if ctx.kernel:
            grad_x, grad_weight, grad_bias = torch.ops.mmattn.sge_backward(
                x, grad.contiguous(), centre, mean, std, weight, bias, groups, eps,
                ctx.needs_input_grad[0])
            return (grad_x if ctx.needs_input_grad[0] else None, grad_weight.view_as(weight),
                    grad_bias.view_as(bias), grad_identity, None, None, None, None)
        xg, dg = _grouped(x, groups), _grouped(grad, groups)
        positions = xg.shape[3]
        xf = xg.to(centre.dtype)
        # The forward's scores and gate again, from x and the kept centres, means and stds.
        score = torch.matmul(centre.transpose(2, 3), xf).sub_(mean)
        gate = _activate(score, std, weight, bias, eps)
        denom = std + eps
        normed = score / denom
        w = weight.to(xf.dtype).view(1, groups, 1, 1)

        # out = x * gate: the gate's gradient sums over each group's channels.
        product = dg * xg
        grad_gate = product.sum(dim=2, keepdim=True, dtype=xf.dtype)
        grad_logit = grad_gate * gate * (1 - gate)
        grad_weight = (grad_logit * normed).sum(dim=(0, 2, 3)).view_as(weight)
        grad_bias = grad_logit.sum(dim=(0, 2, 3)).view_as(bias)
        # normed = score / (std + eps), std = sqrt(sum(score^2) / (HW - 1)), score centred;
        # the std's gradient is taken as 0 where it is 0 (an all-equal group).
        grad_normed = grad_logit * w
        grad_denom = -(grad_normed * score).sum(dim=3, keepdim=True) / denom.square()
        grad_var = torch.where(std > 0, grad_denom / (2 * std).clamp_min(1e-38),
                               torch.zeros_like(std))
        grad_score = grad_normed / denom + grad_var * (2 / max(positions - 1, 1)) * score
        grad_score = grad_score - grad_score.mean(dim=3, keepdim=True)
        # score = centre^T x and centre = mean of x over the positions.
        grad_centre = torch.matmul(xf, grad_score.transpose(2, 3)) / positions

        grad_x = None
        if ctx.needs_input_grad[0]:
            # x * gate's own term, then the rank-2 update [centre, grad_centre] [grad_score; 1],
            # written into the product's memory, which is no longer needed.
            n, g, cg, m = xg.shape
            left = torch.cat([centre, grad_centre], dim=3)
            right = torch.cat([grad_score, torch.ones_like(grad_score)], dim=2)
            if product.dtype == xf.dtype:
                out = torch.mul(dg, gate, out=product)
            else:
                out = dg.to(xf.dtype) * gate
            if out.is_contiguous():
                out.view(n * g, cg, m).baddbmm_(left.view(n * g, cg, 2), right.view(n * g, 2, m))
            else:
                # channels_last: samples and groups do not merge into one batch dimension.
                out.add_(torch.matmul(left, right))
            grad_x = out.reshape(grad.shape).to(grad.dtype)
        return (grad_x, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype), grad_identity,
                None, None, None, None)
