# BAM-ResNet-50: one BAM on the output of stages 1, 2 and 3 only (bam1..bam3, as PI names them). PI recipe.
# Targets (PI, papers.md §2): top-1 76.898, top-5 93.402, 25.92M params.
_base_ = './resnet50.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='BottleneckAttention', rd_ratio=1 / 16), position='after_stage',
         stages=(True, True, True, False)),
]))
