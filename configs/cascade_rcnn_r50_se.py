# SE-ResNet-50 Cascade R-CNN: SE (reduction 1/16) after conv3 + bn3 of every bottleneck, before the
# residual add.
# Recipe: the SGE paper's (see the base).
_base_ = './_base_/cascade_rcnn_sge_paper.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='SqueezeExcitation', rd_ratio=1 / 16), position='after_conv3'),
]))
