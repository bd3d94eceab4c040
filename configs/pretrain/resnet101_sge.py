# SGE-ResNet-101: resnet50_sge.py at depth 101, PI recipe.
# Targets (PI, papers.md §2): top-1 78.798, top-5 94.368, 44.55M params.
_base_ = './resnet50_sge.py'

model = dict(backbone=dict(depth=101))
