import pathlib
import re

import pytest
import torch
import torch.nn as nn
from mmengine.registry import MODELS, DefaultScope

from mmattn.analysis import COUNTING_RULES, backbone_complexity, model_complexity
from mmattn.blocks import SpatialGroupEnhance

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Backbone GFLOPs at 1333x800, fc removed, typed from papers.md 1.1 / 1.2.
PAPER_GFLOPS = {'retinanet_r50': 88.032, 'retinanet_r50_sge': 88.149, 'retinanet_r101': 167.908}


@pytest.fixture
def configs(tmp_path) -> list:
    r101 = tmp_path / 'retinanet_r101.py'
    r101.write_text(f"_base_ = '{ROOT / 'configs/retinanet_r50.py'}'\n"
                    'model = dict(backbone=dict(depth=101))\n')
    return [ROOT / 'configs/retinanet_r50.py', ROOT / 'configs/retinanet_r50_sge.py', r101]


def test_get_flops_matches_the_papers_within_one_percent(run_tool, configs):
    output = run_tool('get_flops.py', *configs)
    for name, paper in PAPER_GFLOPS.items():
        row = re.search(rf'^\| {name} \|.*$', output, re.M).group(0)
        cells = [cell.strip() for cell in row.strip('|').split('|')]
        ours = float(cells[5])
        assert cells[6] == f'{paper:.3f}'
        assert abs(ours - paper) / paper < 0.01, row
    assert COUNTING_RULES in output


def test_get_flops_takes_the_shape(run_tool, configs):
    output = run_tool('get_flops.py', configs[0], '--shape', '400', '667')
    assert '| retinanet_r50 | backbone, fc removed | 667x400 |' in output


class _Tiny(nn.Module):
    """conv -> BN -> ReLU -> max pool -> SGE -> + input: every kind of op the counter knows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.sge = SpatialGroupEnhance(8, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.relu(self.bn(self.conv(x))))
        return self.sge(out) + out


def test_papers_convention_counts_layers_relu_and_pooling_not_arithmetic():
    h, w = 9, 11
    positions = 8 * h * w
    expected = (positions * 27  # conv multiply-adds
                + 2 * positions  # BN scale and shift
                + positions  # ReLU
                + positions  # max pool reads its input
                + 8 * (h // 2) * (w // 2))  # SGE's group means: global pooling of its input
    complexity = model_complexity(_Tiny(), (3, h, w))
    assert complexity.papers_flops == expected


def test_all_block_ops_adds_the_blocks_arithmetic_only():
    complexity = model_complexity(_Tiny(), (3, 9, 11))
    assert complexity.flops - complexity.papers_flops > 2 * 8 * 4 * 5  # product and gate
    assert complexity.block_flops == complexity.per_block['sge']
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    counted = model_complexity(plain, (3, 9, 11))
    assert counted.flops == counted.papers_flops and counted.block_flops == 0


def test_counting_leaves_the_model_as_it_was():
    model = _Tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model_complexity(model, (3, 9, 11))
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_backbone_complexity_counts_the_parameters():
    cfg = dict(type='AttnResNet', depth=50, base_channels=16,
               plugins=[dict(cfg=dict(type='SpatialGroupEnhance', groups=16),
                             position='after_conv3')])
    with DefaultScope.overwrite_default_scope('mmdet'):
        complexity = backbone_complexity(cfg, (3, 64, 96))
        model = MODELS.build(cfg)
    assert complexity.params == sum(p.numel() for p in model.parameters())
    assert len(complexity.per_block) == 16
