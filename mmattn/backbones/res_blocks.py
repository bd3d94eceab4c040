"""mmdet's residual blocks with named plugin positions, including the ones mmdet lacks.

The blocks keep mmdet's submodule names (conv1, bn1, ..., downsample), so stock ResNet weights load
unchanged; plugin modules are attached by :class:`~mmattn.backbones.AttnResNet` after construction.

Where each position sits (``[P]`` is the plugin; in_channels in units of the block's ``planes``):

=======================  ====================================  =================================
position                 Bottleneck (ResNet-50/101/152)        BasicBlock (ResNet-18/34)
=======================  ====================================  =================================
after_conv1_pre_norm     conv1 -> [P] -> bn1 -> relu  (1)      conv1 -> [P] -> bn1 -> relu  (1)
after_conv1              conv1 -> bn1 -> relu -> [P]  (1)      conv1 -> bn1 -> relu -> [P]  (1)
after_conv2              conv2 -> bn2 -> relu -> [P]  (1)      conv2 -> bn2 -> [P] -> +id   (1)
after_conv3              conv3 -> bn3 -> [P] -> +id   (4)      (none: a BasicBlock has 2 convs)
=======================  ====================================  =================================

``+id`` is the residual add, followed by the block's final ReLU. after_conv1/2/3 of the Bottleneck
are mmdet's positions, unchanged. In a BasicBlock conv2 is the last conv and nothing but the add
follows bn2, so its after_conv2 is the point "after the last conv + BN, before the add" where the
papers put SE and SGE: the same place as a Bottleneck's after_conv3.

Fusion. The blocks own their intermediate tensors, so they may hand them to a plugin for good:

- Before the residual add (Bottleneck after_conv3, BasicBlock after_conv2), when the last plugin
  there offers ``fused_residual`` (see :mod:`mmattn.blocks._common`), the block calls
  ``plugin.fused_residual(out, identity, restore)`` instead of ``out = plugin(out)`` and
  ``out += identity``: the gate is applied inside the add, without a new feature map. When that
  plugin is the only one there, its input is the norm's output, and ``restore`` lets its backward
  recompute that output from the norm's input (which the norm keeps for backward anyway) instead
  of keeping a second copy; not under ``with_cp``, whose checkpoint already recomputes the block.
- Elsewhere, a plugin that offers ``forward_inplace`` is called through it: it may overwrite its
  input when autograd does not need it and keep its output, not its input, for backward.
- A frozen norm next to a lone plugin (a BN using its running statistics, as mmdet's
  ``norm_eval=True`` keeps them) is ``x * scale + shift`` per channel (:func:`frozen_affine`), and
  is folded into a plugin that offers it: ``fused_norm_residual(src, scale, shift, identity)``
  after the last conv, instead of the norm and ``fused_residual``, where the plugin's optional
  ``folds_norm(src, identity)`` accepts the tensors (without it: with autograd);
  ``fused_pre_norm(x, scale, shift)`` at after_conv1_pre_norm instead of the plugin and bn1.

With autograd the outputs have the unfused bits (the product is rounded before the add, as the
unfused ops do) and the gradients agree to rounding; without autograd the gate and the add are one
``addcmul`` pass, equal to within the last bit. A plugin with forward hooks or pre-hooks is always
called as a module, so the hooks see what they expect.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck
from torch.nn.modules.batchnorm import _BatchNorm

from ..blocks._common import Restore, batch_norm_affine, frozen_affine, has_hooks


def norm_restore(norm: nn.Module, norm_input: torch.Tensor) -> Restore | None:
    """How to recompute ``norm(norm_input)`` in backward, as its forward pass computes it.

    Batch norm (including SyncBN in eval mode) qualifies: the same ``F.batch_norm`` call on the
    same input gives the same bits, with the batch statistics in training mode (and no update of
    the running statistics) or, in eval mode, a copy of the running statistics taken now (call it
    next to the forward pass). Its weight and bias are read when it runs, in backward, before an
    optimizer step changes them. In eval mode the norm is a per-channel affine map, given as
    ``Restore.affine`` too. Anything else returns None.
    """
    if not isinstance(norm, _BatchNorm):
        return None
    batch_stats = norm.training or (norm.running_mean is None and norm.running_var is None)
    affine = None
    if batch_stats:
        if isinstance(norm, nn.SyncBatchNorm):  # its statistics span processes
            return None
        running_mean = running_var = None
    else:
        running_mean, running_var = norm.running_mean.clone(), norm.running_var.clone()
        with torch.no_grad():
            affine = batch_norm_affine(norm, running_mean, running_var)
    fn = partial(F.batch_norm, running_mean=running_mean, running_var=running_var,
                 weight=norm.weight, bias=norm.bias, training=batch_stats, momentum=0.0,
                 eps=norm.eps)
    return Restore(norm_input, fn, affine)


class _PluginPositions:
    """Mixin: per position, the names of the plugin modules run there, in order.

    ``plugin_positions`` maps each position to the plugin's input width as a multiple of the
    block's ``planes``. The names live in ``<position>_plugin_names``, mmdet's attribute names.
    """

    plugin_positions: dict[str, int] = {}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for position in self.plugin_positions:
            # Keep the names mmdet's Bottleneck sets when it is given plugins itself.
            if not hasattr(self, f'{position}_plugin_names'):
                setattr(self, f'{position}_plugin_names', [])

    def add_plugin(self, position: str, name: str, module: nn.Module) -> None:
        """Register ``module`` as submodule ``name``, run after those already at ``position``."""
        self.add_module(name, module)
        getattr(self, f'{position}_plugin_names').append(name)
        self.with_plugins = True

    def forward_plugin(self, x: torch.Tensor, plugin_names: list[str]) -> torch.Tensor:
        for name in plugin_names:
            x = getattr(self, name)(x)
        return x

    def forward_owned_plugin(self, x: torch.Tensor, plugin_names: list[str]) -> torch.Tensor:
        """``forward_plugin`` for an ``x`` the block gives up and does not modify afterwards."""
        for name in plugin_names:
            module = getattr(self, name)
            if hasattr(module, 'forward_inplace') and not has_hooks(module):
                x = module.forward_inplace(x)
            else:
                x = module(x)
        return x

    def fused_plugin(self, plugin_names: list[str]) -> nn.Module | None:
        """The plugin before the residual add that is fused with it, if any: the last one."""
        last = getattr(self, plugin_names[-1]) if plugin_names else None
        if last is None or not hasattr(last, 'fused_residual') or has_hooks(last):
            return None
        return last

    def restore_norm(self, plugin_names: list[str], norm: nn.Module, norm_input: torch.Tensor,
                     checkpointed: bool) -> Restore | None:
        """How the fused plugin's backward recomputes ``norm(norm_input)``, its input.

        Only when autograd records the block, outside ``with_cp``, and the plugin is the only one
        there (its input is the norm's output). Otherwise None, and ``norm_input`` is not held:
        in inference it is freed as soon as the norm has run, as in the unfused block.
        """
        if (checkpointed or len(plugin_names) != 1 or not torch.is_grad_enabled()
                or self.fused_plugin(plugin_names) is None):
            return None
        return norm_restore(norm, norm_input)

    def lone_plugin(self, plugin_names: list[str], method: str) -> nn.Module | None:
        """The one plugin at a position, if it offers ``method`` and has no hooks."""
        if len(plugin_names) != 1:
            return None
        plugin = getattr(self, plugin_names[0])
        return plugin if hasattr(plugin, method) and not has_hooks(plugin) else None

    def plugins_then_norm(self, out: torch.Tensor, plugin_names: list[str],
                          norm: nn.Module) -> torch.Tensor:
        """``norm(plugins(out))`` (after_conv1_pre_norm), for an ``out`` the block gives up.

        A lone plugin that offers ``fused_pre_norm`` gets a frozen norm folded in (see
        :func:`frozen_affine`): one pass for the gate and the norm.
        """
        plugin = self.lone_plugin(plugin_names, 'fused_pre_norm')
        affine = None if plugin is None else frozen_affine(norm)
        if affine is None:
            return norm(self.forward_owned_plugin(out, plugin_names))
        return plugin.fused_pre_norm(out, *affine)

    def norm_then_residual(self, out: torch.Tensor, identity: torch.Tensor,
                           plugin_names: list[str], norm: nn.Module,
                           checkpointed: bool) -> torch.Tensor:
        """``plugins(norm(out)) + identity``, for an ``out`` (the last conv's) the block gives up.

        A lone plugin that offers ``fused_norm_residual`` gets a frozen norm folded in (see
        :func:`frozen_affine`), so the norm's own pass and backward disappear into the gate's:
        where its ``folds_norm(out, identity)`` says so, or, if it has none, with autograd.
        Otherwise the norm runs, then :meth:`forward_residual`.
        """
        plugin = self.lone_plugin(plugin_names, 'fused_norm_residual')
        affine = None
        if plugin is not None and (plugin.folds_norm(out, identity) if hasattr(plugin, 'folds_norm')
                                   else torch.is_grad_enabled()):
            affine = frozen_affine(norm)
        if affine is not None:
            return plugin.fused_norm_residual(out, *affine, identity)
        restore = self.restore_norm(plugin_names, norm, out, checkpointed)
        return self.forward_residual(norm(out), identity, plugin_names, restore)

    def forward_residual(self, out: torch.Tensor, identity: torch.Tensor, plugin_names: list[str],
                         restore: Restore | None) -> torch.Tensor:
        """The plugins before the residual add, then ``out + identity``, fused where possible.

        The block gives ``out`` up; ``restore`` comes from :meth:`restore_norm`.
        """
        last = self.fused_plugin(plugin_names)
        if last is None:
            out = self.forward_plugin(out, plugin_names)
            out += identity
            return out
        out = self.forward_plugin(out, plugin_names[:-1])
        return last.fused_residual(out, identity, restore)


class AttnBasicBlock(_PluginPositions, BasicBlock):
    """mmdet's BasicBlock with plugin positions and fusion (see the module docstring).

    ``forward`` is mmdet's with the plugin calls added. With ``with_cp`` it uses the
    non-reentrant checkpoint that torch recommends (mmdet leaves the choice to torch's
    deprecated default, which warns); the results are the same.
    """

    plugin_positions = {'after_conv1_pre_norm': 1, 'after_conv1': 1, 'after_conv2': 1}

    def forward(self, x: torch.Tensor) -> torch.Tensor:

        def _inner_forward(x: torch.Tensor) -> torch.Tensor:
            identity = x

            out = self.conv1(x)
            out = self.plugins_then_norm(out, self.after_conv1_pre_norm_plugin_names, self.norm1)
            out = self.relu(out)
            out = self.forward_owned_plugin(out, self.after_conv1_plugin_names)

            out = self.conv2(out)
            if self.downsample is not None:
                identity = self.downsample(x)

            return self.norm_then_residual(out, identity, self.after_conv2_plugin_names,
                                           self.norm2, checkpointed)

        checkpointed = self.with_cp and x.requires_grad
        if checkpointed:
            out = cp.checkpoint(_inner_forward, x, use_reentrant=False)
        else:
            out = _inner_forward(x)
        return self.relu(out)


class AttnBottleneck(_PluginPositions, Bottleneck):
    """mmdet's Bottleneck with plugin positions and fusion (see the module docstring).

    ``forward`` is mmdet's with the after_conv1_pre_norm call added; ``with_cp`` as in
    :class:`AttnBasicBlock`.
    """

    plugin_positions = {
        'after_conv1_pre_norm': 1,
        'after_conv1': 1,
        'after_conv2': 1,
        'after_conv3': Bottleneck.expansion,
    }

    def forward(self, x: torch.Tensor) -> torch.Tensor:

        def _inner_forward(x: torch.Tensor) -> torch.Tensor:
            identity = x

            out = self.conv1(x)
            out = self.plugins_then_norm(out, self.after_conv1_pre_norm_plugin_names, self.norm1)
            out = self.relu(out)
            out = self.forward_owned_plugin(out, self.after_conv1_plugin_names)

            out = self.conv2(out)
            out = self.norm2(out)
            out = self.relu(out)
            out = self.forward_owned_plugin(out, self.after_conv2_plugin_names)

            out = self.conv3(out)
            if self.downsample is not None:
                identity = self.downsample(x)

            return self.norm_then_residual(out, identity, self.after_conv3_plugin_names,
                                           self.norm3, checkpointed)

        checkpointed = self.with_cp and x.requires_grad
        if checkpointed:
            out = cp.checkpoint(_inner_forward, x, use_reentrant=False)
        else:
            out = _inner_forward(x)
        return self.relu(out)
