"""The whole chain for the authors' COCO checkpoints: a v1 (mmdetection 0.6) checkpoint built here
-> tools/convert_detector_checkpoint.py (mmdet's upgrade_model_version + mmattn's fixes) -> the
original mmdet 3.x weights, exactly -> tools/test.py-style evaluation with the COCO table."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmattn.apis.config import load_config
from mmattn.checkpoint import ConversionError, convert_detector_checkpoint
from mmattn.checkpoint.detector import build_detector

ROOT = Path(__file__).resolve().parents[2]
RETINA = ROOT / 'configs/demo/retinanet_r50_sge_synthetic.py'
V1_META = {'mmdet_version': '0.6.0+a6ee6ef',
           'config': "# retinanet_r50_fpn_2x.py\nmodel = dict(type='RetinaNet')\n"}

# A narrow copy of configs/faster_rcnn_r50_sge.py (80 classes, as the authors').
FASTER = f"""
_base_ = '{ROOT}/configs/faster_rcnn_r50_sge.py'
model = dict(
    backbone=dict(base_channels=16, init_cfg=None, plugins=[
        dict(cfg=dict(type='SpatialGroupEnhance', groups=16), position='after_conv3')]),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=32),
                  bbox_head=dict(in_channels=32, fc_out_channels=64)))
"""


def _weights(config):
    torch.manual_seed(0)
    model = build_detector(load_config(str(config)).model)
    for name, param in model.named_parameters():  # no two outputs alike: reorderings show
        if '_cls.' in name or '_reg.' in name:
            torch.nn.init.normal_(param, std=0.01)
            if name.endswith('cls.bias'):
                param.data += 2  # confident scores: the evaluation sees detections
    return {key: value.clone() for key, value in model.state_dict().items()}


def _v1_retinanet(state_dict):
    """mmdetection 0.6's RetinaNet: same keys; retina_cls is sigmoid with num_classes - 1 outputs
    per anchor (no background channel, v1 counted background in num_classes only)."""
    return {'meta': dict(V1_META), 'state_dict': dict(state_dict)}


def _v1_faster_rcnn(state_dict, num_classes=80):
    """mmdetection 0.6's Faster R-CNN: bbox_head at the top level, fc_cls softmax over
    background + classes with background FIRST, class-specific fc_reg with 4 background rows
    first; the RPN (sigmoid, one output per anchor) as it is."""
    v1 = {}
    for key, value in state_dict.items():
        key = key.replace('roi_head.bbox_head.', 'bbox_head.')
        if key.startswith('bbox_head.fc_cls.'):
            assert value.shape[0] == num_classes + 1  # mmdet 3.x: background last
            value = torch.cat([value[num_classes:], value[:num_classes]])
        elif key.startswith('bbox_head.fc_reg.'):
            assert value.shape[0] == num_classes * 4
            value = torch.cat([torch.randn(4, *value.shape[1:]), value])
        v1[key] = value
    meta = dict(V1_META, config="# faster_rcnn_r50_fpn_2x.py\nmodel = dict(type='FasterRCNN')\n")
    return {'meta': meta, 'state_dict': v1}


def _assert_same(converted, original):
    assert converted.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(converted[key], value), key


def test_retinanet_v1_chain_and_evaluation(tmp_path):
    original = _weights(RETINA)
    v1 = _v1_retinanet(original)
    src, dst = tmp_path / 'sge_retinanet_v1.pth', tmp_path / 'converted.pth'
    torch.save(v1, src)
    done = subprocess.run([sys.executable, str(ROOT / 'tools/convert_detector_checkpoint.py'),
                           str(src), str(dst), '--config', str(RETINA)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert 'upgraded from mmdet 0.6.0' in done.stdout and 'tools/test.py' in done.stdout
    # mmdet's script rotates retina_cls.bias; mmattn keeps it (no background channel).
    assert 'kept bbox_head.retina_cls.bias' in done.stdout
    converted = torch.load(dst, weights_only=True)
    _assert_same(converted['state_dict'], original)

    from mmattn.apis import test
    from mmattn.datasets import make_synthetic_coco
    data = tmp_path / 'data'
    make_synthetic_coco(data, num_train=2, num_val=2, image_size=(128, 128))
    metrics = test(str(RETINA), str(dst), work_dir=str(tmp_path / 'work'),
                   cfg_options={'data_root': f'{data}/'})
    for key in ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s', 'bbox_mAP_m',
                'bbox_mAP_l'):
        assert f'coco/{key}' in metrics


def test_faster_rcnn_v1_top_level_bbox_head(tmp_path):
    config = tmp_path / 'faster_rcnn_narrow.py'
    config.write_text(FASTER)
    original = _weights(config)
    src, dst = tmp_path / 'v1.pth', tmp_path / 'converted.pth'
    torch.save(_v1_faster_rcnn(original), src)
    result = convert_detector_checkpoint(src, dst, config)
    assert result.upgraded
    _assert_same(torch.load(dst, weights_only=True)['state_dict'], original)
    assert any('kept rpn_head.rpn_cls.bias' in line for line in result.log)
    with pytest.raises(ConversionError, match='exists'):
        convert_detector_checkpoint(src, dst, config)


def test_mismatch_writes_nothing(tmp_path):
    v1 = _v1_retinanet(_weights(RETINA))
    del v1['state_dict']['bbox_head.retina_reg.bias']
    v1['state_dict']['bbox_head.extra.weight'] = torch.zeros(1)
    src, dst = tmp_path / 'v1.pth', tmp_path / 'converted.pth'
    torch.save(v1, src)
    with pytest.raises(ConversionError, match='missing .*retina_reg.bias.*unexpected'):
        convert_detector_checkpoint(src, dst, RETINA)
    assert not dst.exists() and list(tmp_path.iterdir()) == [src]
