# SGE-ResNet-50 RetinaNet: SGE (64 groups) after conv3 + bn3 of every bottleneck, before the
# residual add.
# Recipe: the SGE paper's (see the base).
_base_ = './_base_/retinanet_sge_paper.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='SpatialGroupEnhance', groups=64), position='after_conv3'),
]))
