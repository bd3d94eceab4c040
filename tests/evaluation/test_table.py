"""COCO metrics become the papers' percent table; other metrics are listed as they are."""
import pytest

from mmattn.evaluation import coco_bbox_ap, metrics_table

COCO = {'coco/bbox_mAP': 0.375, 'coco/bbox_mAP_50': 0.591, 'coco/bbox_mAP_75': 0.406,
        'coco/bbox_mAP_s': 0.199, 'coco/bbox_mAP_m': 0.396, 'coco/bbox_mAP_l': -1.0}


def test_coco_ap_in_percent_and_empty_buckets_stay_minus_one():
    assert coco_bbox_ap(COCO) == pytest.approx({'AP': 37.5, 'AP50': 59.1, 'AP75': 40.6,
                                                'AP_S': 19.9, 'AP_M': 39.6, 'AP_L': -1.0})


def test_no_detections_means_zero_ap():
    assert set(coco_bbox_ap({}).values()) == {0.0}


def test_detection_metrics_print_the_coco_row():
    table = metrics_table(COCO, 'ckpt.pth')
    assert table.splitlines()[0] == '| checkpoint | AP | AP50 | AP75 | AP_S | AP_M | AP_L |'
    assert table.splitlines()[2] == '| ckpt.pth | 37.5 | 59.1 | 40.6 | 19.9 | 39.6 | -1.0 |'


def test_classification_metrics_are_listed():
    table = metrics_table({'accuracy/top1': 77.584, 'accuracy/top5': 93.664}, 'ckpt.pth')
    assert '| accuracy/top1 | 77.6 |' in table
    assert '| accuracy/top5 | 93.7 |' in table
