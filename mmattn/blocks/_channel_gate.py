"""Channel gates computed from spatial pools: ``x * g(mean(x), max(x))``, as one autograd node.

SE, ECA and CGD gate each channel by a small function ``g`` of x's spatial mean (and, for CGD's
cascade, its spatial max). Written as plain ops, training keeps x for the product's backward
and autograd adds three gradients for x, each a new feature map: the product's, the mean's
(broadcast over H x W) and the max's (zeros with one entry per channel). Here the block is one
autograd node whose backward writes x's gradient in one pass,
``grad * g + d mean / (H * W)`` (plus the max's entries, scattered in place), into the one feature
map it allocates. ``g``'s own graph (a few (N, C) tensors and the block's parameters) is recorded
in the forward pass and differentiated with :func:`torch.autograd.grad` in backward, so any
module may compute it, including one with BN.

A block opts in by defining ``pools_max`` (bool) and ``gate_from_pools(mean, peak)``: (N, C)
statistics in fp32 (x's dtype if wider) -> the (N, C) gate, ``peak`` None unless ``pools_max``.
"""
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from ._common import Restore, fp32_region, multiply_add_, needs_grad, spatial_mean, stat_dtype


def pooled_gate(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's gate for ``x`` as (N, C, 1, 1) in x's dtype, with plain autograd ops."""
    with fp32_region(x):
        mean = spatial_mean(x)
        peak = x.amax(dim=(2, 3)).to(mean.dtype) if block.pools_max else None
        return block.gate_from_pools(mean, peak).to(x.dtype)[:, :, None, None]


def gate_residual(block: nn.Module, x: torch.Tensor, identity: torch.Tensor,
                  restore: Restore | None = None) -> torch.Tensor:
    """``identity + x * gate(x)`` written over ``x``, for a backbone that gives ``x`` up.

    With autograd, backward keeps the (N, C) pools and gate and ``restore.source`` (without
    ``restore``: x, and the sum goes to a new tensor).
    """
    if needs_grad(x, identity, *block.parameters()):
        return _apply(block, x, identity, restore, overwrite=restore is not None)
    return multiply_add_(x, pooled_gate(block, x), identity)


def gate_inplace(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x * gate(x)`` written over ``x``, for a caller that gives ``x`` up and does not modify
    the result in place.

    With autograd, backward keeps the product (which the next layer, a BN or conv, keeps anyway)
    and the gate, not x: x is the product over the gate, and a channel whose gate is 0 gets no
    gate gradient (exact where the 0 comes from the gate's saturation, whose slope is 0 too).
    """
    if needs_grad(x, *block.parameters()):
        return _apply(block, x, None, None, overwrite=True)
    return x.mul_(pooled_gate(block, x))


def _apply(block: nn.Module, x: torch.Tensor, identity: torch.Tensor | None,
           restore: Restore | None, overwrite: bool) -> torch.Tensor:
    params = [p for p in block.parameters() if p.requires_grad]
    source = fn = scale = shift = None
    if restore is not None:
        source, fn = restore.source, restore.fn
        if restore.affine is not None:
            scale, shift = restore.affine
    return _PooledGate.apply(block, overwrite, x, identity, source, fn, scale, shift, *params)


class _PooledGate(torch.autograd.Function):
    """out = x * g(pools(x)) (+ identity); see the module docstring.

    What backward keeps to form ``sum over H x W of grad * x``, per channel:
    - with ``scale``/``shift`` (x = source * scale + shift): ``source``;
    - with ``fn`` (x = fn(source)): ``source``, and x is recomputed;
    - with an identity and neither: x (the sum goes to a new tensor);
    - without an identity (``gate_inplace``): the output, as x * g.
    """

    @staticmethod
    def forward(ctx, block: nn.Module, overwrite: bool, x: torch.Tensor,
                identity: torch.Tensor | None, source: torch.Tensor | None,
                fn: Callable[[torch.Tensor], torch.Tensor] | None, scale: torch.Tensor | None,
                shift: torch.Tensor | None, *params: torch.Tensor) -> torch.Tensor:
        with fp32_region(x):
            mean = spatial_mean(x)
            index = peak = None
            if block.pools_max:
                peak, index = x.flatten(2).max(dim=2)
                peak = peak.to(mean.dtype)
            # g's graph, over leaves that stand for the pools, and the block's parameters.
            leaves = [t.detach().requires_grad_() for t in (mean, peak) if t is not None]
            with torch.enable_grad():
                gate = block.gate_from_pools(*leaves, *([None] if peak is None else []))
        g = gate.detach().to(x.dtype)[:, :, None, None]
        ctx.gate, ctx.leaves, ctx.params, ctx.fn = gate, leaves, params, fn
        ctx.shape = x.shape

        if identity is None:
            ctx.mode = 'output'
            ctx.mark_dirty(x)
            out = x.mul_(g)
            ctx.save_for_backward(out, g, index)
            return out
        if source is not None:
            ctx.mode = 'affine' if scale is not None else 'restore'
            ctx.save_for_backward(source, g, index, scale, shift)
        else:
            ctx.mode = 'kept'
            ctx.save_for_backward(x, g, index)
        if overwrite:
            ctx.mark_dirty(x)
            return multiply_add_(x, g, identity)
        return multiply_add_(x, g, identity, out=torch.empty_like(x))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        kept, g, index, *affine = ctx.saved_tensors
        dtype = stat_dtype(grad)
        # sum over H x W of grad * x, per (n, c), and a feature map to reuse for x's gradient.
        if ctx.mode == 'affine':
            scale, shift = affine
            products = torch.mul(grad, kept)
            grad_gate = (products.sum(dim=(2, 3), dtype=dtype) * scale
                         + grad.sum(dim=(2, 3), dtype=dtype) * shift)
        else:
            x = Restore(kept, ctx.fn)() if ctx.mode == 'restore' else kept
            products = torch.mul(grad, x)
            grad_gate = products.sum(dim=(2, 3), dtype=dtype)
            if ctx.mode == 'output':  # the products are grad * x * g
                gate = g.flatten(1).to(dtype)
                grad_gate = torch.where(gate != 0, grad_gate / gate, torch.zeros_like(gate))

        inputs = [*ctx.leaves, *ctx.params]
        # retain_graph: g's graph is a few (N, C) tensors, freed with this node; keeping it
        # lets a caller run backward twice (retain_graph=True outside, as gradcheck does).
        grads = torch.autograd.grad(ctx.gate, inputs, grad_gate.to(ctx.gate.dtype),
                                    retain_graph=True, allow_unused=True)
        grad_mean, grad_peak = grads[0], grads[1] if len(ctx.leaves) == 2 else None
        grad_params = grads[len(ctx.leaves):]

        grad_x = None
        if ctx.needs_input_grad[2]:
            h, w = ctx.shape[2:]
            grad_x = products if products.dtype == grad.dtype else torch.empty_like(grad)
            from_mean = (torch.zeros_like(g) if grad_mean is None
                         else (grad_mean / (h * w)).to(grad.dtype)[:, :, None, None])
            torch.addcmul(from_mean, grad, g, out=grad_x)
            if grad_peak is not None:
                grad_x.flatten(2).scatter_add_(2, index[:, :, None],
                                               grad_peak.to(grad.dtype)[:, :, None])
        grad_identity = grad if ctx.needs_input_grad[3] else None
        return (None, None, grad_x, grad_identity, None, None, None, None, *grad_params)

