"""Turning evaluation results into the tables the papers print."""
from .table import COCO_BBOX_COLUMNS, coco_bbox_ap, markdown_table, metrics_table

__all__ = ['COCO_BBOX_COLUMNS', 'coco_bbox_ap', 'markdown_table', 'metrics_table']
