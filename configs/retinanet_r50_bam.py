# BAM-ResNet-50 RetinaNet: BAM (reduction 1/16, dilation 4) on the outputs of stages 1-3
# (bam1..bam3); frozen_stages=1 freezes bam1 with stage 1.
# Recipe: the SGE paper's (see the base).
_base_ = './_base_/retinanet_sge_paper.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='BottleneckAttention', rd_ratio=1 / 16, dilation=4),
         position='after_stage', stages=(True, True, True, False)),
]))

# The SGE paper trained this row with 1 image/GPU (x 8 GPUs) at the same lr.
train_dataloader = dict(batch_size=1)
auto_scale_lr = dict(base_batch_size=8)
