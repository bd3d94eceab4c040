"""Checkpoint loading: safe unpickling of mmengine checkpoints, conversion of authors' weights."""
from .convert import (
    PLUGIN_RULES,
    SOURCE_FORMATS,
    Conversion,
    ConversionError,
    convert_checkpoint,
    convert_state_dict,
    describe_conversion,
    detect_format,
    load_source,
    verify_conversion,
)
from .detector import (
    DetectorConversion,
    convert_detector_checkpoint,
    mmdet_upgrade_module,
    upgrade_v1_state_dict,
)
from .safe_load import (
    CheckpointRefusedError,
    allow_mmengine_checkpoints,
    load_checkpoint_file,
    mmengine_checkpoint_globals,
)

__all__ = [
    'PLUGIN_RULES', 'SOURCE_FORMATS', 'CheckpointRefusedError', 'Conversion', 'ConversionError',
    'DetectorConversion', 'convert_detector_checkpoint', 'mmdet_upgrade_module',
    'upgrade_v1_state_dict',
    'allow_mmengine_checkpoints', 'convert_checkpoint', 'convert_state_dict',
    'describe_conversion', 'detect_format', 'load_checkpoint_file', 'load_source',
    'mmengine_checkpoint_globals',
    'verify_conversion'
]
