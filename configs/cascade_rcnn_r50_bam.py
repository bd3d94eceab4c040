# BAM-ResNet-50 Cascade R-CNN: BAM (reduction 1/16, dilation 4) on the outputs of stages 1-3
# (bam1..bam3); frozen_stages=1 freezes bam1 with stage 1.
# Recipe: the SGE paper's (see the base).
_base_ = './_base_/cascade_rcnn_sge_paper.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='BottleneckAttention', rd_ratio=1 / 16, dilation=4),
         position='after_stage', stages=(True, True, True, False)),
]))
