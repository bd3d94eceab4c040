# SGE-ResNet-50: SGE (64 groups) after conv3 + bn3 of every bottleneck, before the residual add. PI recipe.
# Targets (PI, papers.md §2): top-1 77.584, top-5 93.664, 25.56M params.
_base_ = './resnet50.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='SpatialGroupEnhance', groups=64), position='after_conv3'),
]))
