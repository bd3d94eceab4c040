"""Speed and memory of the attention blocks against the plain backbone and reference code.

``tools/analysis/benchmark.py`` is the command line over :func:`run` and :func:`markdown`.
"""
from .report import check_targets, cost_share, machine_line, markdown, merge
from .suite import BLOCKS, BlockSpec, Setting, all_settings, amp_dtype, default_settings, run

__all__ = ['BLOCKS', 'BlockSpec', 'Setting', 'all_settings', 'amp_dtype', 'check_targets',
           'cost_share', 'default_settings', 'machine_line', 'markdown', 'merge', 'run']
