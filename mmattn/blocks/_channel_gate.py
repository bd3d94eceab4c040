"""Channel gates computed from spatial pools: ``x * g(mean(x), max(x))``, as one autograd node.

SE, ECA and CGD gate each channel by a small function ``g`` of x's spatial mean (and, for CGD's
cascade, its spatial max). Written as plain ops, training keeps x for the product's backward
and autograd adds three gradients for x, each a new feature map: the product's, the mean's
(broadcast over H x W) and the max's (zeros with one entry per channel). Here the block is one
autograd node whose backward writes x's gradient in one pass, ``grad * g + d mean / (H * W)``
(plus the max's entries, scattered in place); forming ``sum(grad * x)`` for g takes one product
more. A frozen BN next to the gate can be folded into the same node (the second half of this
module). ``g``'s own graph (a few (N, C) tensors and the block's parameters) is recorded
in the forward pass and differentiated with :func:`torch.autograd.grad` in backward, so any
module may compute it, including one with BN.

A block opts in by defining ``pools_max`` (bool) and ``gate_from_pools(mean, peak)``: (N, C)
statistics in fp32 (x's dtype if wider) -> the (N, C) gate, ``peak`` None unless ``pools_max``;
:class:`PooledGateMixin` (or :class:`MeanGateMixin`) then gives it ``forward`` and the methods a
backbone fuses with (see ``mmattn.blocks._common``).
"""
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from .. import kernels
from ._common import (
    Restore,
    affine_residual,
    channel_affine,
    fp32_region,
    grad_sums,
    multiply_add_,
    needs_grad,
    spatial_mean,
)


class PooledGateMixin:
    """``forward`` and the fused entry points of a block defined by ``gate_from_pools``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * pooled_gate(self, x)

    def fused_residual(self, x: torch.Tensor, identity: torch.Tensor,
                       restore: Restore | None = None) -> torch.Tensor:
        """``identity + self(x)`` for a backbone that gives ``x`` up (see ``blocks._common``)."""
        return gate_residual(self, x, identity, restore)

    def fused_pre_norm(self, x: torch.Tensor, scale: torch.Tensor,
                       shift: torch.Tensor) -> torch.Tensor:
        """``self(x) * scale + shift``: a frozen BN after the block folded in (see
        :func:`gate_norm`), for a backbone that gives ``x`` up."""
        return gate_norm(self, x, scale, shift)

    def inference_kernel(self) -> tuple[str, tuple[torch.Tensor, ...]] | None:
        """The name of the CPU kernel op (``torch.ops.mmattn.<name>``) that computes
        ``identity + self(src * scale + shift)`` without autograd in one call, and the weights it
        takes after those four tensors and ``out``; None (the default) where there is none for
        this block's configuration."""
        return None

    def gate_kernels(self) -> tuple[str, str, tuple[torch.Tensor | None, ...]] | None:
        """The CPU kernel ops of ``gate_from_pools`` and of its backward, and the weights they
        take after the pools (see ``mmattn::cgd_gate``), for a frozen BN folded in
        (:func:`norm_gate_residual`, :func:`gate_norm`) with autograd; None (the default):
        ``gate_from_pools`` is recorded and differentiated with autograd."""
        return None

    def training_kernels(self) -> tuple[str, str, tuple[torch.Tensor, ...]] | None:
        """The CPU kernel ops of ``identity + self(src * scale + shift)`` with autograd and of
        its backward, and the weights (every parameter) they take after the tensors (see
        ``mmattn::se_norm_residual``); None (the default) where there are none for this
        block's configuration."""
        return None

    def pre_norm_inference_kernel(self) -> tuple[str, tuple[torch.Tensor | None, ...]] | None:
        """As :meth:`inference_kernel`, for ``self(x) * scale + shift`` (the block before a
        frozen BN, :func:`gate_norm`); the op takes ``x, scale, shift, out`` and the weights."""
        return None


class MeanGateMixin(PooledGateMixin):
    """:class:`PooledGateMixin` for a gate of spatial means only, which a frozen BN before the
    block can be folded into (a mean commutes with the BN's per-channel affine map)."""

    pools_max = False

    def folds_norm(self, src: torch.Tensor, identity: torch.Tensor) -> bool:
        """Whether folding the BN pays: with autograd (its backward joins the gate's), and
        without where the affine map and the add are one pass (the CPU kernel)."""
        return torch.is_grad_enabled() or kernels.usable(src, identity)

    def fused_norm_residual(self, src: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                            identity: torch.Tensor) -> torch.Tensor:
        """``identity + self(src * scale + shift)``: a frozen BN before the block folded in
        (see :func:`norm_gate_residual`), for a backbone that gives ``src`` up."""
        return norm_gate_residual(self, src, scale, shift, identity)


def _pool_leaves(block: nn.Module,
                 x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """x's spatial mean (and max, with its argmax) as leaves that require grad, and the argmax.

    Call inside :func:`fp32_region` and without autograd.
    """
    if not block.pools_max:
        return [spatial_mean(x).requires_grad_()], None
    if kernels.usable(x):  # both pools in one pass
        mean, peak, index = torch.ops.mmattn.channel_pools(x, None, None, True)
    else:
        mean = spatial_mean(x)
        peak, index = x.flatten(2).max(dim=2)
    return [mean.requires_grad_(), peak.to(mean.dtype).requires_grad_()], index


def _grad_input(grad: torch.Tensor, factor: torch.Tensor, grad_mean: torch.Tensor | None,
                grad_peak: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor:
    """``grad * factor`` plus the pools' gradients, for (N, C) ``factor`` and pool gradients.

    One pass for the product and the mean's share (spread over H x W); the max's entries are
    then added in place at each channel's argmax.
    """
    hw = grad.shape[2] * grad.shape[3]
    from_mean = torch.zeros_like(factor) if grad_mean is None else grad_mean / hw
    out = channel_affine(grad, factor.to(grad.dtype), from_mean.to(grad.dtype))
    if grad_peak is not None:
        out.flatten(2).scatter_add_(2, index[:, :, None], grad_peak.to(grad.dtype)[:, :, None])
    return out


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
            leaves, index = _pool_leaves(block, x)
            # g's graph, over the leaves that stand for the pools, and the block's parameters.
            with torch.enable_grad():
                gate = block.gate_from_pools(*leaves, *([None] * (2 - len(leaves))))
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
        # sum over H x W of grad * x, per (n, c)
        if ctx.mode == 'affine':
            scale, shift = affine
            by_src, by_one = grad_sums(grad, kept, with_grad_sum=True)
            grad_gate = by_src * scale + by_one * shift
        else:
            x = Restore(kept, ctx.fn)() if ctx.mode == 'restore' else kept
            grad_gate, _ = grad_sums(grad, x, with_grad_sum=False)
            if ctx.mode == 'output':  # the sums are of grad * x * g
                gate = g.flatten(1).to(grad_gate.dtype)
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
            grad_x = _grad_input(grad, g.flatten(1), grad_mean, grad_peak, index)
        grad_identity = grad if ctx.needs_input_grad[3] else None
        return (None, None, grad_x, grad_identity, None, None, None, None, *grad_params)



# ---------------------------------------------------------------------------------------------
# A frozen BN folded in: with running statistics a BN is ``x * scale + shift`` per channel, so a
# backbone whose block owns the BN can hand the block the BN's input and (scale, shift) instead
# of the BN's output. The BN's own pass and its backward then disappear into the gate's.


def norm_gate_residual(block: nn.Module, src: torch.Tensor, scale: torch.Tensor,
                       shift: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """``identity + x * g(x)`` for ``x = src * scale + shift`` (a frozen BN before the gate).

    ``scale`` and ``shift`` are (C, ), differentiable (they carry the BN's weight and bias). The
    gate's pools must be means only (``block.pools_max`` False): a mean commutes with the
    affine map. Backward keeps ``src``, as the BN would, and the (N, C) pools and gate. Without
    autograd, a block's ``inference_kernel`` (where it has one and the kernels take the tensors)
    computes it in one call and writes it over ``src``.
    """
    if block.pools_max:
        raise ValueError(f'{type(block).__name__}: a max pool does not commute with a BN of '
                         'negative scale; call fused_residual on the BN output instead.')
    kernel = None if torch.is_grad_enabled() else block.inference_kernel()
    if kernel is not None and kernels.usable(src, scale, shift, identity, *kernel[1]):
        name, weights = kernel
        getattr(torch.ops.mmattn, name)(src, scale, shift, identity, src, *weights)
        return src
    kernel = block.training_kernels() if torch.is_grad_enabled() else None
    if (kernel is not None and _covers_trained(block, kernel[2])
            and kernels.usable(src, scale, shift, identity, *kernel[2])
            and needs_grad(src, scale, shift, identity, *kernel[2])):
        return _KernelNormGate.apply(*kernel[:2], src, scale, shift, identity, *kernel[2])
    return _folded(block, True, src, scale, shift, identity)


def _covers_trained(block: nn.Module, weights: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether ``weights`` include every parameter of the block that is trained."""
    covered = {id(w) for w in weights if w is not None}
    return all(id(p) in covered for p in block.parameters() if p.requires_grad)


class _KernelNormGate(torch.autograd.Function):
    """:func:`norm_gate_residual` with autograd as the block's two ``training_kernels`` ops:
    forward keeps ``src`` (as the BN would) and the (N, C) means of src and gate, and backward
    is one call that returns every gradient (the identity's is the output's)."""

    @staticmethod
    def forward(ctx, forward_op: str, backward_op: str, src: torch.Tensor, scale: torch.Tensor,
                shift: torch.Tensor, identity: torch.Tensor,
                *weights: torch.Tensor) -> torch.Tensor:
        out, src_means, gate = getattr(torch.ops.mmattn, forward_op)(src, scale, shift,
                                                                     identity, *weights)
        ctx.backward_op = backward_op
        ctx.save_for_backward(src, src_means, gate, scale, shift, *weights)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        # grad_src, grad_scale, grad_shift, then the weights'
        grads = getattr(torch.ops.mmattn, ctx.backward_op)(grad.contiguous(), *ctx.saved_tensors)
        grads.insert(3, grad)  # the identity's
        return None, None, *(g if needed else None
                             for g, needed in zip(grads, ctx.needs_input_grad[2:], strict=True))


def gate_norm(block: nn.Module, x: torch.Tensor, scale: torch.Tensor,
              shift: torch.Tensor) -> torch.Tensor:
    """``(x * g(x)) * scale + shift``: the gate, then a frozen BN, in one pass over x.

    Backward keeps x, which the BN would keep as its input, and the (N, C) pools and gate.
    Without autograd, a block's ``pre_norm_inference_kernel`` (where it has one and the kernels
    take the tensors) computes it in one call and writes it over ``x``.
    """
    kernel = None if torch.is_grad_enabled() else block.pre_norm_inference_kernel()
    if kernel is not None and kernels.usable(x, scale, shift, *kernel[1]):
        name, weights = kernel
        getattr(torch.ops.mmattn, name)(x, scale, shift, x, *weights)
        return x
    return _folded(block, False, x, scale, shift, None)


def _folded(block: nn.Module, norm_first: bool, src: torch.Tensor, scale: torch.Tensor,
            shift: torch.Tensor, identity: torch.Tensor | None) -> torch.Tensor:
    params = [p for p in block.parameters() if p.requires_grad]
    if needs_grad(src, scale, shift, identity, *params):
        return _FoldedNorm.apply(block, norm_first, src, scale, shift, identity, *params)
    with torch.no_grad(), fp32_region(src):
        mean = spatial_mean(src)
        s, t = (v.to(mean.dtype) for v in (scale, shift))
        if norm_first:
            g = block.gate_from_pools(mean * s + t, None)
        else:
            peak = src.amax(dim=(2, 3)).to(mean.dtype) if block.pools_max else None
            g = block.gate_from_pools(mean, peak)
    return _folded_output(src, g, s, t, norm_first, identity)


def _folded_output(src: torch.Tensor, g: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                   norm_first: bool, identity: torch.Tensor | None) -> torch.Tensor:
    """src * (g * s) + (g * t or t) (+ identity), per (n, c), in a new tensor."""
    a = (g * s).to(src.dtype)
    b = (g * t if norm_first else t.expand_as(g)).to(src.dtype).contiguous()
    return affine_residual(src, a, b, identity)


class _FoldedNorm(torch.autograd.Function):
    """A pooled channel gate and a frozen BN (x = src * scale + shift) as one node.

    norm_first: out = identity + g(x) * x, the pools taken from x (SE, ECA after bn3).
    otherwise:  out = g(src) * src * scale + shift (CGD between conv1 and bn1).
    Either way out = src * a + b per (n, c), with a = g * scale and b = g * shift (norm first)
    or b = shift, plus the identity; backward needs, per (n, c), the sums over H x W of
    grad * src and of grad, and writes src's gradient in one pass.
    """

    @staticmethod
    def forward(ctx, block: nn.Module, norm_first: bool, src: torch.Tensor, scale: torch.Tensor,
                shift: torch.Tensor, identity: torch.Tensor | None,
                *params: torch.Tensor) -> torch.Tensor:
        with fp32_region(src):
            leaves, index = _pool_leaves(block, src)
            affine = [t.detach().to(leaves[0].dtype).requires_grad_() for t in (scale, shift)]
            ctx.kernel = _gate_kernels(block, leaves)
            if ctx.kernel is not None:  # the gate and its backward as one op each, no graph
                pools = [leaf.detach() for leaf in leaves] + [None] * (2 - len(leaves))
                if norm_first:  # the pools of x = src * scale + shift
                    pools[0] = pools[0] * affine[0].detach() + affine[1].detach()
                forward_op, _, weights = ctx.kernel
                gate = getattr(torch.ops.mmattn, forward_op)(*pools, *weights)
                ctx.pools = pools
            else:
                with torch.enable_grad():
                    if norm_first:
                        gate = block.gate_from_pools(leaves[0] * affine[0] + affine[1], None)
                    else:
                        gate = block.gate_from_pools(*leaves, *([None] * (2 - len(leaves))))
        g = gate.detach()
        ctx.dtypes = scale.dtype, shift.dtype
        ctx.norm_first, ctx.block_leaves = norm_first, leaves
        ctx.gate, ctx.affine, ctx.params = gate, affine, params
        ctx.save_for_backward(src, g, index)
        return _folded_output(src, g, affine[0].detach(), affine[1].detach(), norm_first,
                              identity)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        src, g, index = ctx.saved_tensors
        s, t = (v.detach() for v in ctx.affine)
        by_src, by_one = grad_sums(grad, src, with_grad_sum=True)
        if ctx.norm_first:
            # out = identity + g * (src * s + t)
            grad_gate = by_src * s + by_one * t
            grad_s, grad_t = (g * by_src).sum(0), (g * by_one).sum(0)
        else:
            # out = g * src * s + t
            grad_gate = by_src * s
            grad_s, grad_t = (g * by_src).sum(0), by_one.sum(0)

        # Through g: to the pools of src (with norm first, through x's pools, mean(src) * s + t),
        # the block's parameters, and s and t.
        if ctx.kernel is not None:
            grad_mean, grad_peak, extra_s, extra_t, grad_params = _kernel_gate_grads(
                ctx, grad_gate.to(g.dtype))
        else:
            grad_mean, grad_peak, extra_s, extra_t, grad_params = _graph_gate_grads(
                ctx, grad_gate.to(ctx.gate.dtype))
        if extra_s is not None:
            grad_s = grad_s + extra_s
        if extra_t is not None:
            grad_t = grad_t + extra_t

        grad_src = None
        if ctx.needs_input_grad[2]:
            grad_src = _grad_input(grad, g * s, grad_mean, grad_peak, index)
        grad_scale = grad_s.to(ctx.dtypes[0]) if ctx.needs_input_grad[3] else None
        grad_shift = grad_t.to(ctx.dtypes[1]) if ctx.needs_input_grad[4] else None
        grad_identity = grad if ctx.needs_input_grad[5] else None
        return (None, None, grad_src, grad_scale, grad_shift, grad_identity, *grad_params)


def _gate_kernels(block: nn.Module, pools: list[torch.Tensor]) -> tuple[str, str, tuple] | None:
    """The block's ``gate_kernels()`` where the CPU kernels take the pools and weights, and
    the weights cover every parameter that is trained; else None (the gate's graph is recorded
    and differentiated with autograd)."""
    spec = block.gate_kernels()
    if spec is None or not _covers_trained(block, spec[2]) or not kernels.usable(*pools, *spec[2]):
        return None
    return spec


def _kernel_gate_grads(ctx, grad_gate: torch.Tensor) -> tuple:
    """(grad_mean, grad_peak, extra_s, extra_t, grad_params) through the gate's backward op."""
    _, backward_op, weights = ctx.kernel
    grad_mean, grad_peak, *grad_weights = getattr(torch.ops.mmattn, backward_op)(
        grad_gate.contiguous(), *ctx.pools, *weights)
    extra_s = extra_t = None
    if ctx.norm_first:  # the pool was mean(src) * s + t
        mean = ctx.block_leaves[0].detach()
        s = ctx.affine[0].detach()
        extra_s, extra_t = (grad_mean * mean).sum(0), grad_mean.sum(0)
        grad_mean = grad_mean * s
    if len(ctx.block_leaves) < 2:
        grad_peak = None
    found = {id(w): grad for w, grad in zip(weights, grad_weights, strict=True) if w is not None}
    grad_params = [found[id(p)].view_as(p) for p in ctx.params]
    return grad_mean, grad_peak, extra_s, extra_t, grad_params


def _graph_gate_grads(ctx, grad_gate: torch.Tensor) -> tuple:
    """(grad_mean, grad_peak, extra_s, extra_t, grad_params) through the recorded gate graph."""
    targets = [*ctx.block_leaves, *(ctx.affine if ctx.norm_first else []), *ctx.params]
    # retain_graph: the graph is a few (N, C) tensors, freed with the node; keeping it lets a
    # caller run backward twice (retain_graph=True outside, as gradcheck does).
    grads = list(torch.autograd.grad(ctx.gate, targets, grad_gate, retain_graph=True,
                                     allow_unused=True))
    grad_mean = grads.pop(0)
    grad_peak = grads.pop(0) if len(ctx.block_leaves) == 2 else None
    extra_s = extra_t = None
    if ctx.norm_first:
        extra_s, extra_t = grads.pop(0), grads.pop(0)
    return grad_mean, grad_peak, extra_s, extra_t, grads
