# SGE-ResNet-50 RetinaNet: SGE (64 groups) after conv3 + bn3 of every bottleneck, before the residual add.
# The paper started from its own ImageNet SGE-ResNet-50; this starts from torchvision's ResNet-50, whose
# weights load into every layer but the SGE gates (those begin at the paper's 0/1 init).
_base_ = './retinanet_r50.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='SpatialGroupEnhance', groups=64), position='after_conv3'),
]))
