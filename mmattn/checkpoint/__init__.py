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
from .safe_load import (
    CheckpointRefusedError,
    allow_mmengine_checkpoints,
    load_checkpoint_file,
    mmengine_checkpoint_globals,
)

__all__ = [
    'PLUGIN_RULES', 'SOURCE_FORMATS', 'CheckpointRefusedError', 'Conversion', 'ConversionError',
    'allow_mmengine_checkpoints', 'convert_checkpoint', 'convert_state_dict',
    'describe_conversion', 'detect_format', 'load_checkpoint_file', 'load_source',
    'mmengine_checkpoint_globals',
    'verify_conversion'
]
