"""Helpers shared by the blocks: argument checks, the fp32 statistics region, residual fusion."""
import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from .. import kernels


def check_divisible(block: nn.Module, in_channels: int, **divisors: int) -> None:
    """Raise ValueError unless every named divisor divides ``in_channels``."""
    for name, value in divisors.items():
        if value < 1 or in_channels % value:
            raise ValueError(
                f'{type(block).__name__}: in_channels={in_channels} is not '
                f'divisible by {name}={value}; choose a {name} that divides '
                f'{in_channels} (e.g. {name}={_largest_divisor(in_channels, value)}).')


def reduced_channels(block: nn.Module, in_channels: int, rd_ratio: float) -> int:
    """Width of a reduction layer: ``in_channels * rd_ratio``, at least 1."""
    if not 0 < rd_ratio <= 1:
        raise ValueError(
            f'{type(block).__name__}: rd_ratio={rd_ratio} must be a fraction in '
            '(0, 1], e.g. rd_ratio=1 / 16 for a 16x reduction.')
    return max(1, int(in_channels * rd_ratio + 1e-9))


def fp32_region(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off for ``x``'s device, so statistics stay in fp32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype statistics of ``x`` are taken in: fp32 for half precision, else x's own."""
    return torch.promote_types(x.dtype, torch.float32)


def check_batch_statistics(block: nn.Module, name: str, values: int, seen: str) -> None:
    """Raise ValueError when the BatchNorm ``block.<name>``, in training mode, would see one value
    per channel (``values``, what ``seen`` describes), where torch's own error names neither the
    block nor the fix. SyncBN is not checked: it takes its statistics over all processes."""
    norm = block.get_submodule(name)
    if values == 1 and norm.training and isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d)):
        raise ValueError(
            f'{type(block).__name__}: {name} is a BatchNorm in training mode but sees one value '
            f'per channel ({seen}); train with the backbone\'s norm_eval=True (frozen BN, as '
            'detectors do with 1 image per GPU), SyncBN over several GPUs, or at least 2 images '
            'per batch.')


def frozen_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, shift)``, each (C, ), with ``norm(x) == x * scale + shift`` per channel.

    For a batch norm that uses its running statistics (eval mode, as mmdet's ``norm_eval=True``
    keeps every BN of a detection backbone) and has no hooks; else None. The two carry autograd
    to the norm's weight and bias, so a block that folds the norm in still trains them.
    """
    if (not isinstance(norm, _BatchNorm) or norm.training or norm.running_mean is None
            or norm.running_var is None or has_hooks(norm)):
        return None
    return batch_norm_affine(norm, norm.running_mean, norm.running_var)


def batch_norm_affine(norm: _BatchNorm, mean: torch.Tensor,
                      var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch norm with statistics (mean, var) as ``x * scale + shift`` per channel."""
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs forward hooks or pre-hooks (its own or global ones): a
    fused path that skips the module's call would skip them."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def pointwise_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, as a batched matrix product (:func:`pointwise_matmul`) where
    :func:`is_pointwise_gemm` accepts the two, else ``conv``'s own call.

    oneDNN's convolution first reorders an NCHW input into its blocked layout, a pass over the
    whole map; MKL's GEMM reads the map as it is. BAM's reduction to 16 channels at stage 1
    (8x256x56x56) takes 1.1 ms against 2.3 ms, and its backward gains as much.
    """
    if not is_pointwise_gemm(conv, x):
        return conv(x)
    return pointwise_matmul(x, conv.weight.flatten(1), conv.bias)


def is_pointwise_gemm(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``conv`` is a 1x1 convolution (stride 1, no padding, no groups, no hooks) that
    :func:`pointwise_conv` runs on ``x`` as a matrix product: a contiguous float32 or float64 CPU
    tensor without autocast. Not where :func:`mmattn.kernels.plain_cpu_tensors` refuses the
    tensors (while torch.compile traces or a Python dispatch mode runs, too: the FLOP counter of
    ``mmattn.analysis.complexity`` counts the convolution as a layer).
    """
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.groups == 1 and x.dim() == 4
            and kernels.plain_cpu_tensors(x, conv.weight, conv.bias)
            and not torch.is_autocast_enabled('cpu') and not has_hooks(conv))


def pointwise_matmul(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution of the (N, C, H, W) ``x`` with the (O, C) ``weight`` and (O, ) ``bias``
    (or None), as the weight times each sample's (C, H x W) map, the bias added in the same call.
    """
    n, c, h, w = x.shape
    weight = weight.expand(n, -1, -1)
    flat = x.view(n, c, h * w)
    if bias is None:
        out = torch.bmm(weight, flat)
    else:
        out = torch.baddbmm(bias[None, :, None], weight, flat)
    return out.view(n, -1, h, w)


class PointwiseConvSequential(nn.Sequential):
    """``nn.Sequential`` whose 1x1 convolutions run through :func:`pointwise_conv`; the same
    modules and state-dict keys, hooks on the sequence itself still fire."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = pointwise_conv(layer, x)
        return x


# ---------------------------------------------------------------------------------------------
# Fusion: optional methods a backbone may call instead of ``block(x)``
#
# ``fused_residual(x, identity, restore=None)`` returns ``identity + block(x)``. A backbone that
# owns the residual add (AttnBottleneck at 'after_conv3', AttnBasicBlock at 'after_conv2') calls
# it instead of ``block(x)`` followed by ``+= identity``: the gate is applied inside the add and
# no new feature map is allocated, because x (the backbone's own norm output, which it gives up)
# is overwritten. ``restore`` says how to recompute x in backward from a tensor autograd keeps
# anyway (the norm's input), so that x itself is not kept for backward.
#
# ``forward_inplace(x)`` returns ``block(x)`` for an x the caller gives up, and whose result it
# does not modify in place; the block may overwrite x, and keep its output (which the next layer
# keeps anyway) for backward instead of x (see ``blocks._channel_gate.gate_inplace``).
#
# Both give the outputs and gradients of the plain calls, to within rounding.


class Restore(NamedTuple):
    """Recomputes a block's input in backward instead of keeping it for backward.

    Attributes:
        source (Tensor): A tensor autograd keeps anyway (a norm layer's input).
        fn (Callable): ``fn(source)`` returns the block's input exactly as the forward pass saw
            it; it is called without autograd, and may be called more than once.
        affine (tuple[Tensor, Tensor], optional): ``(scale, shift)``, each (C, ), when the block's
            input is ``source * scale + shift`` per channel to within rounding (a norm in eval
            mode). A per-channel gate's gradient then needs only sums over ``source``, not the
            input itself. Defaults to None.
    """

    source: torch.Tensor
    fn: Callable[[torch.Tensor], torch.Tensor]
    affine: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            return self.fn(self.source)


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over H x W, (N, C, H, W) -> (N, C), in :func:`stat_dtype`.

    A sum divided by H * W: its backward broadcasts the (N, C) gradient as a view, where the
    backward of ``mean`` writes out a full (N, C, H, W) quotient.
    """
    return x.sum(dim=(2, 3), dtype=stat_dtype(x)) / (x.shape[2] * x.shape[3])


def spatial_max(x: torch.Tensor) -> torch.Tensor:
    """Max over H x W, (N, C, H, W) -> (N, C), in :func:`stat_dtype`.

    With autograd, a max with indices, whose backward keeps the (N, C) indices instead of x
    (``amax`` keeps x); without, ``amax``, several times faster on the CPU.
    """
    if needs_grad(x):
        return x.flatten(2).max(dim=2).values.to(stat_dtype(x))
    return x.amax(dim=(2, 3)).to(stat_dtype(x))


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` with one factor and one term per sample and channel, (N, C).

    One vectorised pass: the CPU kernel where it takes the tensors (one op, where the next way
    takes four), else torch's batch-norm kernel in eval mode, over x viewed as a single sample
    of N * C channels, with mean 0, variance 1 and eps 0, which computes exactly
    ``x * scale + shift`` per channel. ``torch.addcmul`` with a broadcast (N, C, 1, 1) input
    takes about twice as long on the CPU. Tensors that cannot be viewed that way (channels_last)
    or of another dtype than the factors take a multiply and an add.
    """
    n, c = x.shape[:2]
    if x.dim() == 4 and kernels.usable(x, scale, shift):
        out = torch.empty_like(x)
        torch.ops.mmattn.channel_affine_residual(x, scale.reshape(n, c), shift.reshape(n, c),
                                                 None, out)
        return out
    scale, shift = scale.reshape(n * c), shift.reshape(n * c)
    if x.is_contiguous() and x.dtype == scale.dtype == shift.dtype:
        mean, var = torch.zeros_like(scale), torch.ones_like(scale)
        flat = F.batch_norm(x.view(1, n * c, *x.shape[2:]), mean, var, scale, shift, False, 0.0,
                            0.0)
        # The same memory as a tensor of x's shape that is not a view (an autograd Function
        # may return it, and the next layer may modify it in place).
        out = torch.empty(0, dtype=x.dtype, device=x.device)
        return out.set_(flat.untyped_storage(), flat.storage_offset(), x.shape, x.stride())
    return torch.mul(x, scale.view(n, c, 1, 1).to(x.dtype)).add_(shift.view(n, c, 1, 1).to(x.dtype))


def affine_residual(src: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    identity: torch.Tensor | None) -> torch.Tensor:
    """``src * a + b (+ identity)`` with (N, C) ``a`` and ``b``, in a new tensor: one pass
    through the CPU kernel (in PyTorch, two with an identity)."""
    if identity is not None and kernels.usable(src, identity, a, b):
        out = torch.empty_like(src)
        torch.ops.mmattn.channel_affine_residual(src, a, b, identity, out)
        return out
    out = channel_affine(src, a, b)
    if identity is not None:
        out += identity
    return out


def grad_sums(grad: torch.Tensor, x: torch.Tensor,
              with_grad_sum: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per (n, c), the sums over H x W of ``grad * x`` and (``with_grad_sum``) of ``grad``, in
    :func:`stat_dtype`: one pass through the CPU kernel, where PyTorch writes the product out
    and sums it."""
    if kernels.usable(grad, x):
        return torch.ops.mmattn.channel_grad_sums(grad, x)
    dtype = stat_dtype(grad)
    by_x = torch.mul(grad, x).sum(dim=(2, 3), dtype=dtype)
    return by_x, grad.sum(dim=(2, 3), dtype=dtype) if with_grad_sum else None


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on ``tensors`` (grad mode on, one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def grouped(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x`` viewed so that ``gate`` broadcasts against it.

    A gate with one dim more than x gates groups of channels: (N, G, 1, ...) against
    x viewed as (N, G, C // G, ...).
    """
    if gate.dim() == x.dim() + 1:
        return x.unflatten(1, (gate.shape[1], -1))
    return x


def gated_residual(x: torch.Tensor, gate: torch.Tensor, identity: torch.Tensor,
                   restore: Restore | None = None) -> torch.Tensor:
    """``identity + x * gate`` written over ``x`` in one pass, for a backbone that gives ``x`` up.

    ``gate`` is one factor per channel, (N, C, 1, 1) or (1, C, 1, 1), cast to x's dtype. The
    sum is one ``addcmul`` pass (see :func:`multiply_add_`). With autograd, backward keeps the
    gate and ``restore.source`` (or, without ``restore``, x, in which case the sum goes to a new
    tensor), never the product.
    """
    if gate.dim() != 4 or gate.shape[1:] != (x.shape[1], 1, 1):
        raise ValueError(f'gated_residual: gate of shape {tuple(gate.shape)} for x of shape '
                         f'{tuple(x.shape)}; it takes one factor per channel, (N, C, 1, 1).')
    gate = gate.to(x.dtype)
    if not needs_grad(x, gate, identity):
        return multiply_add_(x, gate, identity)
    if restore is None:
        return _GatedResidual.apply(x, gate, identity, None, None, None, None)
    scale, shift = restore.affine if restore.affine is not None else (None, None)
    return _GatedResidual.apply(x, gate, identity, restore.source, restore.fn, scale, shift)


def multiply_add_(x: torch.Tensor, gate: torch.Tensor, identity: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``identity + x * gate`` in one pass, written over ``x`` (or into ``out``).

    One ``addcmul`` reads x and identity and writes once, where ``x * gate`` followed by
    ``+= identity`` makes two passes; the product is not rounded on its own, so the sum may
    differ from the two-pass one in the last bit (it is as close or closer to exact).
    """
    out = x if out is None else out
    xg = grouped(x, gate)
    torch.addcmul(grouped(identity, gate), xg, gate, out=grouped(out, gate))
    return out


class _GatedResidual(torch.autograd.Function):
    """identity + x * gate for a per-channel gate, written over x when ``fn`` can recompute x
    from ``source``.

    With ``scale`` and ``shift`` (x = source * scale + shift per channel) the gate's gradient
    comes from two sums over ``source``, without recomputing x. Backward allocates one feature
    map: the input's gradient, which first holds the products the gate's gradient sums.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, identity: torch.Tensor,
                source: torch.Tensor | None, fn: Callable[[torch.Tensor], torch.Tensor] | None,
                scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
        ctx.fn = fn
        ctx.affine = scale is not None
        if fn is None:
            ctx.save_for_backward(x, gate)
            return multiply_add_(x, gate, identity, out=torch.empty_like(x))
        ctx.save_for_backward(source, gate, scale, shift)
        ctx.mark_dirty(x)
        return multiply_add_(x, gate, identity)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        kept, gate, *affine = ctx.saved_tensors
        grad_x = grad_gate = None
        if ctx.needs_input_grad[1]:
            if ctx.affine:
                # sum(grad * (source * scale + shift)) over H x W, per channel.
                scale, shift = (t.view(1, -1, 1, 1) for t in affine)
                products = torch.mul(grad, kept)
                grad_gate = (products.sum(dim=(2, 3), keepdim=True) * scale
                             + grad.sum(dim=(2, 3), keepdim=True) * shift)
            else:
                x = kept if ctx.fn is None else Restore(kept, ctx.fn)()
                products = torch.mul(grad, x)
                grad_gate = products.sum(dim=(2, 3), keepdim=True)
            grad_gate = grad_gate.sum_to_size(gate.shape).to(gate.dtype)
            if ctx.needs_input_grad[0] and products.dtype == grad.dtype:
                grad_x = products  # no longer needed: reuse its memory
        if ctx.needs_input_grad[0]:
            grad_x = torch.mul(grad, gate, out=grad_x)
        grad_identity = grad if ctx.needs_input_grad[2] else None
        return grad_x, grad_gate, grad_identity, None, None, None, None
