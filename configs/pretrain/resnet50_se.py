# SE-ResNet-50: SE (reduction 1/16) after conv3 + bn3 of every bottleneck, before the residual add. PI recipe.
# Targets (PI, papers.md §2): top-1 77.184, top-5 93.672, 28.09M params.
_base_ = './resnet50.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='SqueezeExcitation', rd_ratio=1 / 16), position='after_conv3'),
]))
