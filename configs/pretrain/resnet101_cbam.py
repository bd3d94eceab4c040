# CBAM-ResNet-101: resnet50_cbam.py at depth 101, PI recipe.
# Targets (PI, papers.md §2): top-1 78.354, top-5 94.064, 49.33M params.
_base_ = './resnet50_cbam.py'

model = dict(backbone=dict(depth=101))
