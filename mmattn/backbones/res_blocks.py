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
"""
import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck


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


class AttnBasicBlock(_PluginPositions, BasicBlock):
    """mmdet's BasicBlock with plugin positions (see the module docstring).

    ``forward`` is mmdet's with the plugin calls added. With ``with_cp`` it uses the
    non-reentrant checkpoint that torch recommends (mmdet leaves the choice to torch's
    deprecated default, which warns); the results are the same.
    """

    plugin_positions = {'after_conv1_pre_norm': 1, 'after_conv1': 1, 'after_conv2': 1}

    def forward(self, x: torch.Tensor) -> torch.Tensor:

        def _inner_forward(x: torch.Tensor) -> torch.Tensor:
            identity = x

            out = self.conv1(x)
            out = self.forward_plugin(out, self.after_conv1_pre_norm_plugin_names)
            out = self.norm1(out)
            out = self.relu(out)
            out = self.forward_plugin(out, self.after_conv1_plugin_names)

            out = self.conv2(out)
            out = self.norm2(out)
            out = self.forward_plugin(out, self.after_conv2_plugin_names)

            if self.downsample is not None:
                identity = self.downsample(x)

            out += identity
            return out

        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(_inner_forward, x, use_reentrant=False)
        else:
            out = _inner_forward(x)
        return self.relu(out)


class AttnBottleneck(_PluginPositions, Bottleneck):
    """mmdet's Bottleneck with plugin positions (see the module docstring).

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
            out = self.forward_plugin(out, self.after_conv1_pre_norm_plugin_names)
            out = self.norm1(out)
            out = self.relu(out)
            out = self.forward_plugin(out, self.after_conv1_plugin_names)

            out = self.conv2(out)
            out = self.norm2(out)
            out = self.relu(out)
            out = self.forward_plugin(out, self.after_conv2_plugin_names)

            out = self.conv3(out)
            out = self.norm3(out)
            out = self.forward_plugin(out, self.after_conv3_plugin_names)

            if self.downsample is not None:
                identity = self.downsample(x)

            out += identity
            return out

        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(_inner_forward, x, use_reentrant=False)
        else:
            out = _inner_forward(x)
        return self.relu(out)
