# GSoP-ResNet-50 Faster R-CNN: GSoP-Net1 channel attention (128-d covariance) after conv3 + bn3 of
# the last bottleneck of each stage. GSoP-Net1 runs stage 4 at stride 1 on ImageNet; here every
# stage keeps its standard stride (C5 at 1/32), which FPN and the anchors are built for.
# Recipe: mmdet's standard 1x (see the base); GSoP published no detection results or recipe.
_base_ = './_base_/faster_rcnn.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='GlobalSecondOrderPooling', mode='channel'), position='after_conv3',
         blocks='last'),
]))
