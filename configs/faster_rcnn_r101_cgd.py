# CGD-ResNet-101 Faster R-CNN: faster_rcnn_r50_cgd.py at depth 101.
_base_ = './faster_rcnn_r50_cgd.py'

model = dict(backbone=dict(depth=101, init_cfg=dict(checkpoint='torchvision://resnet101')))
