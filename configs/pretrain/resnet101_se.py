# SE-ResNet-101: resnet50_se.py at depth 101, PI recipe.
# Targets (PI, papers.md §2): top-1 78.468, top-5 94.102, 49.33M params.
_base_ = './resnet50_se.py'

model = dict(backbone=dict(depth=101))
