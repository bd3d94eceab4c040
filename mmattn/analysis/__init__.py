"""Measuring models and results: FLOPs in the papers' convention, the papers' figures,
comparisons of evaluation results with the papers', attention maps."""
from .attention_maps import (
    PANELS,
    AttentionCapture,
    attention_blocks,
    attention_figure,
    capture_attention,
    default_block,
    visualize_attention,
)
from .compare import (
    Comparison,
    ComparisonRow,
    EvalResult,
    ResultError,
    compare,
    comparison_table,
    load_metafile,
    plot_gains,
    read_result,
)
from .complexity import (
    COUNTING_RULES,
    Complexity,
    ConfigComplexity,
    backbone_complexity,
    complexity_table,
    config_complexity,
    model_complexity,
)
from .papers import DETECTION_BACKBONES, IMAGENET_CLASSIFIERS, PaperFigure, paper_figure

__all__ = [
    'COUNTING_RULES', 'DETECTION_BACKBONES', 'IMAGENET_CLASSIFIERS', 'PANELS', 'AttentionCapture',
    'Comparison', 'ComparisonRow', 'Complexity', 'ConfigComplexity', 'EvalResult', 'PaperFigure',
    'ResultError', 'attention_blocks', 'attention_figure', 'backbone_complexity',
    'capture_attention', 'compare', 'comparison_table', 'complexity_table', 'config_complexity',
    'default_block', 'load_metafile', 'model_complexity', 'paper_figure', 'plot_gains',
    'read_result', 'visualize_attention'
]
