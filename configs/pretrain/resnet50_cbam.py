# CBAM-ResNet-50: CBAM (MLP reduction 1/16, 7x7 spatial gate) after conv3 + bn3 of every bottleneck,
# before the residual add. PI recipe.
# Targets (PI, papers.md §2): top-1 77.626, top-5 93.660, 28.09M params.
_base_ = './resnet50.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='ConvolutionalBlockAttention', rd_ratio=1 / 16), position='after_conv3'),
]))
