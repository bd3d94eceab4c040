"""Compare the COCO box AP of several runs with a baseline and with the papers' numbers.

A result is read from what MMEngine writes (no change to the tools needed):

- a work dir: the newest evaluation in any of its ``<timestamp>/`` runs, training
  (``<timestamp>/vis_data/<timestamp>.json``, one JSON line per log step, validation lines
  carry ``coco/bbox_mAP``...) or testing (``<timestamp>/<timestamp>.json``, one JSON object);
- one of those files, or a plain metrics JSON: mmdet's keys (``coco/bbox_mAP``, fractions), or
  the table's columns (``AP``, ``AP50``, ..., percent) or the metafile's (``box AP``, ...).

A result is named after its config: MMEngine dumps the config into the work dir as
``<config name>.py``. The papers' numbers come from the OpenMMLab metafile
(``configs/metafile.yml``): ``Models[].Config`` names the config and
``Results[].Metrics`` holds ``box AP``, ``AP50``, ``AP75``, ``AP_S``, ``AP_M``, ``AP_L`` (each
but the first also read with a ``box`` prefix: ``box AP_S``).
"""
from __future__ import annotations

import json
import os
import os.path as osp
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mmattn.evaluation import COCO_BBOX_COLUMNS, coco_bbox_ap

COLUMNS = tuple(COCO_BBOX_COLUMNS)
"""The table's columns: AP, AP50, AP75, AP_S, AP_M, AP_L (percent)."""
METAFILE_KEYS = {
    'box AP': 'AP', 'AP50': 'AP50', 'AP75': 'AP75', 'AP_S': 'AP_S', 'AP_M': 'AP_M', 'AP_L': 'AP_L',
    'box AP50': 'AP50', 'box AP75': 'AP75', 'box AP_S': 'AP_S', 'box AP_M': 'AP_M',
    'box AP_L': 'AP_L'}
"""Metric key in the metafile's ``Results[].Metrics`` -> column (with or without ``box``)."""
GAIN_COLUMNS = ('AP_S', 'AP_M', 'AP_L')
"""The columns whose gains the chart shows."""

_TIMESTAMP = re.compile(r'^\d{8}_\d{6}$')
_BBOX_KEY = COCO_BBOX_COLUMNS['AP']

Metrics = dict[str, float | None]
"""Column -> AP in percent; None where unknown or where COCO had no object of that size."""


class ResultError(ValueError):
    """A result that cannot be read, or a comparison that cannot be made."""


@dataclass(frozen=True)
class EvalResult:
    """The box AP of one run.

    Attributes:
        name (str): The config's name (or the label given on the command line).
        metrics (dict): Column -> AP in percent, None where unknown.
        source (str): Which file and record the numbers come from.
    """

    name: str
    metrics: Metrics
    source: str


@dataclass(frozen=True)
class ComparisonRow:
    """One result beside the baseline and the papers.

    Attributes:
        name (str): The result's name.
        ours (dict): Our AP per column.
        delta (dict): Ours minus the baseline's (None where either is unknown).
        paper (dict): The paper's AP per column from the metafile (None where it has none).
        paper_delta (dict): The paper's AP minus the paper's AP for the baseline's config.
        source (str): Where our numbers were read.
    """

    name: str
    ours: Metrics
    delta: Metrics
    paper: Metrics
    paper_delta: Metrics
    source: str


@dataclass(frozen=True)
class Comparison:
    """The rows, the baseline first."""

    baseline: str
    rows: list[ComparisonRow] = field(default_factory=list)


# -- reading results ---------------------------------------------------------------------------

def _percent_metrics(record: Mapping[str, object]) -> Metrics | None:
    """Columns from one record, or None if it holds no box AP."""
    if any(key.rsplit('/', 1)[-1] == _BBOX_KEY for key in record):
        numbers = {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}
        try:
            ap = coco_bbox_ap(numbers)
        except KeyError as err:
            raise ResultError(str(err)) from None
        return {column: (None if value < 0 else value) for column, value in ap.items()}
    by_column = {METAFILE_KEYS.get(key, key): value for key, value in record.items()}
    if 'AP' not in by_column:
        return None
    return {column: (float(by_column[column]) if isinstance(by_column.get(column), (int, float))
                     else None) for column in COLUMNS}


def _records(path: str) -> list[dict]:
    """A JSON file as records: one object, or one object per line (MMEngine's scalars log)."""
    with open(path, encoding='utf-8') as file:
        text = file.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ResultError(f'{path} is neither a JSON object nor JSON lines: {err}') from None
    if not isinstance(data, dict):
        raise ResultError(f'{path} holds a JSON {type(data).__name__}; expected an object of '
                          "metrics such as {'coco/bbox_mAP': 0.365, ...}")
    return [data]


def _describe(record: Mapping, path: str) -> str:
    if 'step' in record and 'coco/bbox_mAP' in record:
        return f'val, epoch {record["step"]}: {path}'
    if osp.basename(path) == osp.basename(osp.dirname(path)) + '.json':
        return f'test: {path}'
    return path


def _last_metrics(path: str, records: list[dict] | None = None) -> tuple[Metrics, str] | None:
    for record in reversed(_records(path) if records is None else records):
        metrics = _percent_metrics(record)
        if metrics is not None:
            return metrics, _describe(record, path)
    return None


def _run_files(run_dir: str) -> list[str]:
    """A ``<timestamp>/`` run's evaluation logs: its test dump and its own scalars log.

    Only ``vis_data/<timestamp>.json`` is this run's: a second Runner in the same process
    reuses the first one's visualizer and writes its scalars into the first run's vis_data.
    """
    stamp = osp.basename(osp.normpath(run_dir))
    candidates = [osp.join(run_dir, 'vis_data', f'{stamp}.json'),
                  osp.join(run_dir, f'{stamp}.json')]
    return [path for path in candidates if osp.isfile(path)]


def _find_in_dir(directory: str) -> tuple[Metrics, str] | None:
    stamp = osp.basename(osp.normpath(directory))
    if _TIMESTAMP.match(stamp):
        runs = [directory]
    else:
        runs = sorted((osp.join(directory, entry) for entry in os.listdir(directory)
                       if _TIMESTAMP.match(entry)), reverse=True)
    for run in runs:
        # The test dump is written after the run's last validation.
        for path in reversed(_run_files(run)):
            found = _last_metrics(path)
            if found is not None:
                return found
    return None


def _config_name(path: str) -> str | None:
    """The config MMEngine dumped into the work dir holding ``path`` (``<name>.py``).

    A work dir is recognised by its ``<timestamp>/`` runs; with several dumped configs (runs of
    different configs in one work dir) the newest is taken.
    """
    directory = path if osp.isdir(path) else osp.dirname(osp.abspath(path))
    for _ in range(3):
        entries = os.listdir(directory)
        dumped = [entry for entry in entries if entry.endswith('.py')
                  and not entry.startswith('.')] if any(map(_TIMESTAMP.match, entries)) else []
        if dumped:
            newest = max(dumped, key=lambda entry: osp.getmtime(osp.join(directory, entry)))
            return osp.splitext(newest)[0]
        parent = osp.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return None


def read_result(path: str, name: str | None = None) -> EvalResult:
    """Read the newest COCO box AP in a work dir, a run dir or a JSON file.

    Args:
        path: A work dir, a ``<timestamp>/`` run dir, a scalars / test log JSON, or a plain
            metrics JSON.
        name: The result's name. Defaults to a ``config`` key in a plain JSON, else the config
            dumped in the work dir, else the work dir's (or the file's) name.
    """
    if osp.isdir(path):
        found = _find_in_dir(path)
        what = 'no evaluation with COCO box AP in its <timestamp>/ runs'
    elif osp.isfile(path):
        records = _records(path)
        found = _last_metrics(path, records)
        what = 'no record with COCO box AP (coco/bbox_mAP, or AP / box AP)'
        if name is None and len(records) == 1 and isinstance(records[0].get('config'), str):
            name = osp.splitext(osp.basename(records[0]['config']))[0]
    else:
        raise ResultError(f'{path} does not exist; give a work dir, a run dir or a JSON file.')
    if found is None:
        raise ResultError(
            f'{path}: {what}. Was the run evaluated (train_cfg.val_interval, tools/test.py), '
            'and did the detector output any box (CocoMetric logs nothing when it did not)?')
    metrics, source = found
    if name is None:
        name = _config_name(path)
    if name is None:
        stem = osp.basename(osp.normpath(path))
        name = osp.splitext(stem)[0]
    return EvalResult(name, metrics, source)


# -- the papers' numbers -----------------------------------------------------------------------

def _load_yaml(path: str) -> dict:
    import yaml
    with open(path, encoding='utf-8') as file:
        data = yaml.safe_load(file) or {}
    if not isinstance(data, dict):
        raise ResultError(f'{path}: expected an OpenMMLab metafile (a mapping with Models:).')
    return data


def load_metafile(path: str) -> dict[str, Metrics]:
    """Config name -> the paper's AP per column, from an OpenMMLab metafile / model index.

    Each ``Models[]`` entry is keyed by its ``Config``'s file name and by its ``Name``; the
    metrics of its COCO object detection ``Results`` are merged. ``Import:`` lists (a model
    index) are followed, relative to the file.
    """
    data = _load_yaml(path)
    models = list(data.get('Models') or [])
    for imported in data.get('Import') or []:
        sub = _load_yaml(osp.join(osp.dirname(path), imported))
        models += list(sub.get('Models') or [])
    papers: dict[str, Metrics] = {}
    for model in models:
        metrics: dict[str, float] = {}
        for result in model.get('Results') or []:
            if result.get('Task', 'Object Detection') != 'Object Detection':
                continue
            for key, value in (result.get('Metrics') or {}).items():
                if key in METAFILE_KEYS and isinstance(value, (int, float)):
                    metrics[METAFILE_KEYS[key]] = float(value)
        row = {column: metrics.get(column) for column in COLUMNS}
        for key in (model.get('Config'), model.get('Name')):
            if key:
                papers.setdefault(osp.splitext(osp.basename(str(key)))[0], row)
    return papers


# -- the comparison ----------------------------------------------------------------------------

def _minus(a: Metrics, b: Metrics) -> Metrics:
    return {column: (None if a.get(column) is None or b.get(column) is None
                     else a[column] - b[column]) for column in COLUMNS}


def compare(results: Sequence[EvalResult], baseline: str | None = None,
            papers: Mapping[str, Metrics] | None = None) -> Comparison:
    """Each result's AP, its gain over ``baseline`` (a result's name; default the first), the
    paper's AP for its config and the paper's gain (None where the metafile has no number)."""
    if not results:
        raise ResultError('no result to compare.')
    names = [result.name for result in results]
    if baseline is None:
        baseline = names[0]
    if baseline not in names:
        raise ResultError(f'--baseline {baseline!r} is none of the results: '
                          f'{", ".join(names)}.')
    papers = papers or {}
    empty: Metrics = dict.fromkeys(COLUMNS)
    base = results[names.index(baseline)]
    base_paper = papers.get(baseline, empty)
    ordered = [base] + [result for result in results if result is not base]
    rows = []
    for result in ordered:
        paper = papers.get(result.name, empty)
        rows.append(ComparisonRow(result.name, result.metrics, _minus(result.metrics, base.metrics),
                                  paper, _minus(paper, base_paper), result.source))
    return Comparison(baseline, rows)


def comparison_table(comparison: Comparison) -> str:
    """Markdown: per config a row of ours and a row of the paper's, gains in parentheses."""
    def cell(value: float | None, delta: float | None, show_delta: bool) -> str:
        if value is None:
            return '-'
        if not show_delta or delta is None:
            return f'{value:.1f}'
        return f'{value:.1f} ({delta:+.1f})'

    header = ['config', 'source', *COLUMNS]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for i, row in enumerate(comparison.rows):
        label = f'{row.name} (baseline)' if i == 0 else row.name
        for source, values, deltas in (('ours', row.ours, row.delta),
                                       ('paper', row.paper, row.paper_delta)):
            cells = [cell(values[c], deltas[c], i > 0) for c in COLUMNS]
            lines.append('| ' + ' | '.join([label, source, *cells]) + ' |')
    return '\n'.join(lines)


def plot_gains(comparison: Comparison, path: str, columns: Sequence[str] = GAIN_COLUMNS):
    """Save a bar chart of each result's gain over the baseline (ours solid, the paper's
    hatched) in ``columns``; returns the matplotlib Figure."""
    from matplotlib.figure import Figure

    others = comparison.rows[1:]
    if not others:
        raise ResultError('the chart shows gains over the baseline: give a second result.')
    fig = Figure(figsize=(max(9.0, 5.0 + 0.8 * len(columns) * len(others)), 4.8), dpi=100)
    ax = fig.add_subplot()
    width = 0.8 / (2 * len(others))
    colours = [f'C{i}' for i in range(len(others))]
    for i, (row, colour) in enumerate(zip(others, colours, strict=True)):
        for j, (kind, deltas) in enumerate((('ours', row.delta), ('paper', row.paper_delta))):
            offset = (2 * i + j - len(others) + 0.5) * width
            xs = [k + offset for k, c in enumerate(columns) if deltas[c] is not None]
            ys = [deltas[c] for c in columns if deltas[c] is not None]
            if not xs:
                continue
            bars = ax.bar(xs, ys, width, color=colour, alpha=1.0 if kind == 'ours' else 0.45,
                          hatch=None if kind == 'ours' else '//', edgecolor=colour,
                          label=f'{row.name} ({kind})')
            ax.bar_label(bars, fmt='%+.1f', fontsize='x-small')
    ax.axhline(0, color='black', linewidth=0.8)
    ax.set_xticks(range(len(columns)), list(columns))
    ax.set_ylabel(f'AP gain over {comparison.baseline} (points)')
    ax.set_title('COCO box AP gain over the baseline: ours (solid) vs the paper (hatched)',
                 fontsize='medium')
    ax.margins(y=0.15)
    ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize='small')
    fig.tight_layout()
    fig.savefig(path, format='png')
    return fig
