# GC-ResNet-50 RetinaNet: GC block (mmcv's ContextBlock, ratio 1/16) after conv3 + bn3 of every
# bottleneck of stages 2-4, as mmdet's GCNet configs place it
# (mmdet::gcnet/mask-rcnn_r50-gcb-r16-c3-c5_fpn_1x_coco.py).
# Recipe: mmdet's standard 1x (see the base); mmdet's GCNet configs train with it.
_base_ = './_base_/retinanet.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='ContextBlock', ratio=1 / 16), position='after_conv3',
         stages=(False, True, True, True)),
]))
