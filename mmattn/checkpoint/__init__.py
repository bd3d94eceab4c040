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
from .safe_load import allow_mmengine_checkpoints, mmengine_checkpoint_globals

__all__ = [
    'PLUGIN_RULES', 'SOURCE_FORMATS', 'Conversion', 'ConversionError',
    'allow_mmengine_checkpoints', 'convert_checkpoint', 'convert_state_dict',
    'describe_conversion', 'detect_format', 'load_source', 'mmengine_checkpoint_globals',
    'verify_conversion'
]
