# ResNet-101, PI recipe: resnet50.py at depth 101 (as mmpretrain's resnet101_8xb32_in1k is its R-50 config).
# Targets (PI, papers.md §2): top-1 78.200, top-5 93.906, 44.55M params.
_base_ = './resnet50.py'

model = dict(backbone=dict(depth=101))
