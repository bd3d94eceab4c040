# ECA-ResNet-101 RetinaNet: retinanet_r50_eca.py at depth 101.
_base_ = './retinanet_r50_eca.py'

model = dict(backbone=dict(depth=101, init_cfg=dict(checkpoint='torchvision://resnet101')))
