"""mmattn: attention blocks for ResNet backbones, as MMEngine plugins.

Importing the package registers every block and the AttnResNet backbone in MMEngine's root MODELS
registry (found under scope
mmdet, scope mmpretrain and no scope) and lets torch's weights_only loader read mmengine's own
checkpoints, and makes ``_base_ = 'mmattn::<config>.py'`` resolve to the configs it ships. Configs
load it with
``custom_imports = dict(imports=['mmattn'], allow_failed_imports=False)``.
"""
from . import backbones, blocks, engine  # noqa: F401  (registers AttnResNet, blocks, hooks, loops)
from .checkpoint import allow_mmengine_checkpoints
from .config_scope import resolve_mmattn_configs
from .version import __version__

allow_mmengine_checkpoints()
resolve_mmattn_configs()

__all__ = ['__version__']
