# GC-ResNet-101 Cascade R-CNN: cascade_rcnn_r50_gc.py at depth 101.
_base_ = './cascade_rcnn_r50_gc.py'

model = dict(backbone=dict(depth=101, init_cfg=dict(checkpoint='torchvision://resnet101')))
