# ECA-ResNet-50 Cascade R-CNN: ECA (adaptive kernel size) after conv3 + bn3 of every bottleneck,
# before the residual add.
# Recipe: mmdet's standard 1x (see the base); the ECA paper's detection runs used mmdetection's 1x
# too (8 images at lr 0.01).
_base_ = './_base_/cascade_rcnn.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='EfficientChannelAttention'), position='after_conv3'),
]))
