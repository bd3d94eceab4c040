# GC-ResNet-50: mmcv's ContextBlock (GCNet; ratio 1/16) after conv3 + bn3 of every bottleneck of stages 2-4
# (c3-c5), GCNet's placement and that of mmdet's gcnet configs.
# Targets (GCNet, arXiv 1904.11492, ImageNet table): top-1 77.70, top-5 93.66, 28.08M params.
# Only top-1 (a third-party summary) and 28.08M (counted) were cross-checked; top-5 was not.
# Recipe: the PI 100-epoch step recipe of resnet50.py (GCNet's own ImageNet schedule was not verified).
_base_ = './resnet50.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='ContextBlock', ratio=1 / 16), position='after_conv3',
         stages=(False, True, True, True)),
]))
