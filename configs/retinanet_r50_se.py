# SE-ResNet-50 RetinaNet: SE (reduction 1/16) after conv3 + bn3 of every bottleneck, before the residual add.
# The paper started from its own ImageNet SE-ResNet-50; this starts from torchvision's ResNet-50, whose
# weights load into every layer but the SE layers.
_base_ = './retinanet_r50.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='SqueezeExcitation', rd_ratio=1 / 16), position='after_conv3'),
]))
