"""The benchmark's results as a markdown table, and the issue's targets checked against them."""
from __future__ import annotations

from .suite import BLOCKS, IMPLEMENTATIONS, PLAIN, ratio_of

_SETTING_TITLES = {
    'inference': 'inference',
    'training': 'training',
    'detection': 'detection',
    'inference_amp': 'inference AMP',
    'training_amp': 'training AMP',
    'inference_channels_last': 'inference CL',
    'training_channels_last': 'training CL',
}


def _title(results: dict, setting: str) -> str:
    """A setting's name in the table; AMP names its autocast dtype."""
    title = _SETTING_TITLES.get(setting, setting)
    if setting.endswith('_amp'):
        title += f" {results['config'].get('amp_dtype', 'float16')}"
    return title


def machine_line(results: dict) -> str:
    """One line naming the machine and the run's protocol."""
    m = results['machine']
    config = results['config']
    where = m.get('gpu') or f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads"
    return (f"Machine: {where}; torch {m['torch']}, Python {m['python']}, {m['platform']}. "
            f"Interleaved rounds (count in each column header) after {config['warmup']} "
            f"warm-up, each call the fastest of {config['repeat']} back-to-back, all models in "
            f"one process; malloc: {config['malloc']}.")


def merge(runs: list[dict]) -> dict:
    """Several runs' results as one (later runs' settings replace earlier ones per depth).

    The runs should come from one machine with one protocol; the first run's machine and
    protocol are kept.
    """
    merged = dict(runs[0], results={}, placements={}, targets={})
    merged['config'] = dict(runs[0]['config'], depths=[], blocks=[], settings=[], shapes={})
    for results in runs:
        config = merged['config']
        for key in ('depths', 'blocks', 'settings'):
            config[key] += [v for v in results['config'][key] if v not in config[key]]
        config['shapes'].update(results['config']['shapes'])
        merged['placements'].update(results['placements'])
        merged['targets'].update(results['targets'])
        for depth, by_setting in results['results'].items():
            merged['results'].setdefault(depth, {}).update(by_setting)
    merged.pop('markdown', None)
    return merged


def check_targets(results: dict) -> list[dict]:
    """One entry per (depth, block, target): the measured median ratio against the limit.

    Memory targets are checked on the peak bytes of the training step.
    """
    checks = []
    for depth in results['results']:
        for name, targets in results['targets'].items():
            key = f'{name}/mmattn'
            for target, limit in targets.items():
                if target == 'memory':
                    memory = results['results'][depth].get('memory')
                    if memory is None:
                        continue
                    value = memory['ratios'][key]['peak']
                else:
                    ratio = ratio_of(results, int(depth), target, key)
                    if ratio is None:
                        continue
                    value = ratio.median
                checks.append(dict(depth=int(depth), block=name, target=target, limit=limit,
                                   value=value, met=value <= limit))
    return checks


def markdown(results: dict) -> str:
    """The results as markdown: a machine line, then one table per depth."""
    lines = [machine_line(results), '',
             'Each cell: median [interquartile range] over the rounds of (time with the block) / '
             '(mean time of the two plain-backbone calls around it). Memory: the training '
             "step's peak allocated bytes and the bytes autograd keeps for backward, over the "
             "plain backbone's. Share of the reference's cost: mmattn's extra time (ratio - 1) "
             "over the reference's, per timed setting (the issue's aim: at most 0.5). "
             "Targets: the issue's limits for the mmattn rows, met or MISSED (on the CPU "
             'inference, training and peak memory; on CUDA training <= 1.10 for the light '
             'blocks in each training setting).', '']
    checks = {(c['depth'], c['block'], c['target']): c for c in check_targets(results)}
    settings = results['config']['settings']
    for depth, by_setting in results['results'].items():
        shapes = results['config']['shapes']
        plain = ', '.join(f"{_title(results, s)} {by_setting[s]['plain_seconds']:.3f} s"
                          for s in settings if s in by_setting)
        blocks = [name for name in results['config']['blocks']
                  if any(key.startswith(f'{name}/') for entry in by_setting.values()
                         for key in entry.get('ratios', {}))]
        memory = by_setting.get('memory')
        if memory is not None:
            plain += f", training peak {memory['bytes'][PLAIN]['peak'] / 2**20:.0f} MiB"
        lines += [f'ResNet-{depth} (plain backbone: {plain})', '']
        header = ['block', 'placement', 'code']
        header += [f"{_title(results, s)} {'x'.join(map(str, shapes[s]))}"
                   f"{_rounds(by_setting.get(s))}" for s in settings]
        if memory is not None:
            header += ['train peak mem', 'train saved']
        header += ['share of the reference\'s cost', 'targets']
        lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        for name in blocks:
            spec = BLOCKS[name]
            for implementation in IMPLEMENTATIONS:
                key = f'{name}/{implementation}'
                if implementation == 'mmattn' and spec.mmattn is None:
                    continue
                first = implementation == 'mmattn' or spec.mmattn is None
                row = [name if first else '', spec.placement if first else '', implementation]
                for s in settings:
                    ratio = ratio_of(results, int(depth), s, key)
                    row.append('' if ratio is None else str(ratio))
                if memory is not None:
                    ratios = memory['ratios'].get(key)
                    row += ([f"{ratios['peak']:.3f}", f"{ratios['saved']:.3f}"] if ratios
                            else ['', ''])
                mine = implementation == 'mmattn'
                row.append(_cost_share(results, int(depth), name, settings) if mine else '')
                row.append(_target_cell(checks, int(depth), name) if mine else '')
                lines.append('| ' + ' | '.join(row) + ' |')
        lines.append('')
    return '\n'.join(lines)


def _rounds(entry: dict | None) -> str:
    if not entry or not entry.get('ratios'):
        return ' (not run)'
    return f" ({next(iter(entry['ratios'].values()))['rounds']} rounds)"


def cost_share(results: dict, depth: int, name: str, setting: str) -> float | None:
    """mmattn's extra time over the plain backbone as a fraction of the reference's extra time.

    None when either was not measured, or the reference costs nothing measurable.
    """
    mine = ratio_of(results, depth, setting, f'{name}/mmattn')
    theirs = ratio_of(results, depth, setting, f'{name}/reference')
    if mine is None or theirs is None or theirs.median <= 1:
        return None
    return (mine.median - 1) / (theirs.median - 1)


def _cost_share(results: dict, depth: int, name: str, settings: list[str]) -> str:
    parts = []
    for setting in settings:
        share = cost_share(results, depth, name, setting)
        if share is not None:
            parts.append(f'{_title(results, setting)} {share:.2f}')
    return ', '.join(parts)


def _target_cell(checks: dict, depth: int, name: str) -> str:
    parts = []
    for (at, block, target), check in checks.items():
        if (at, block) == (depth, name):
            verdict = 'met' if check['met'] else 'MISSED'
            parts.append(f"{_SETTING_TITLES.get(target, target)} <= {check['limit']:.2f} "
                         f'{verdict}')
    return ', '.join(parts)
