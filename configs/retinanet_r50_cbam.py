# CBAM-ResNet-50 RetinaNet: CBAM (reduction 1/16: channel gate, then 7x7 spatial gate) after conv3 +
# bn3 of every bottleneck, before the residual add.
# Recipe: the SGE paper's (see the base).
_base_ = './_base_/retinanet_sge_paper.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='ConvolutionalBlockAttention', rd_ratio=1 / 16), position='after_conv3'),
]))

# The SGE paper trained this row with 1 image/GPU (x 8 GPUs) at the same lr.
train_dataloader = dict(batch_size=1)
auto_scale_lr = dict(base_batch_size=8)
