"""COCO box AP in the papers' form (percent, one decimal) and plain markdown tables."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

# Column name -> the suffix of mmdet's CocoMetric key (its keys read 'coco/bbox_mAP_s' ...).
COCO_BBOX_COLUMNS = {
    'AP': 'bbox_mAP',
    'AP50': 'bbox_mAP_50',
    'AP75': 'bbox_mAP_75',
    'AP_S': 'bbox_mAP_s',
    'AP_M': 'bbox_mAP_m',
    'AP_L': 'bbox_mAP_l',
}


def coco_bbox_ap(metrics: Mapping[str, float]) -> dict[str, float]:
    """Box AP columns in percent from CocoMetric results (any prefix such as ``coco/``).

    A size bucket with no ground truth is -1 in COCOeval; it stays -1 rather than turning into a
    misleading -100. CocoMetric returns no metrics at all when the model detected nothing (no
    score above the test threshold): every AP is then 0.
    """
    if not metrics:
        return dict.fromkeys(COCO_BBOX_COLUMNS, 0.0)
    by_suffix = {key.rsplit('/', 1)[-1]: value for key, value in metrics.items()}
    missing = [key for key in COCO_BBOX_COLUMNS.values() if key not in by_suffix]
    if missing:
        raise KeyError(f'metrics lack {missing}; is the evaluator a CocoMetric with '
                       f"metric='bbox'? Got keys {sorted(metrics)}")
    return {column: (100.0 * float(by_suffix[key]) if float(by_suffix[key]) >= 0 else -1.0)
            for column, key in COCO_BBOX_COLUMNS.items()}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats with one decimal, like the papers' tables."""
    def cell(value: object) -> str:
        return f'{value:.1f}' if isinstance(value, float) else str(value)

    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(cell(value) for value in row) + ' |' for row in rows]
    return '\n'.join(lines)


def metrics_table(metrics: Mapping[str, float], row_name: str,
                  name_column: str = 'checkpoint') -> str:
    """The COCO box AP table for detection metrics; every metric as a row otherwise (accuracy).

    Args:
        metrics: What the evaluator returned.
        row_name: Names the evaluated thing (a checkpoint path), in the first column.
        name_column: Header of the first column.
    """
    suffixes = {key.rsplit('/', 1)[-1] for key in metrics}
    if not metrics or set(COCO_BBOX_COLUMNS.values()) <= suffixes:
        ap = coco_bbox_ap(metrics)
        return markdown_table([name_column, *COCO_BBOX_COLUMNS], [[row_name, *ap.values()]])
    return markdown_table(['metric', row_name],
                          [[key, float(value)] for key, value in sorted(metrics.items())])
