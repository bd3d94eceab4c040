# CBAM-ResNet-50 Cascade R-CNN: CBAM (reduction 1/16: channel gate, then 7x7 spatial gate) after
# conv3 + bn3 of every bottleneck, before the residual add.
# Recipe: the SGE paper's (see the base).
_base_ = './_base_/cascade_rcnn_sge_paper.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='ConvolutionalBlockAttention', rd_ratio=1 / 16), position='after_conv3'),
]))
