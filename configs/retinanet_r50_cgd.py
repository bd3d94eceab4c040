# CGD-ResNet-50 RetinaNet: CGD (cascade) right after conv1 of every bottleneck, before bn1.
# Recipe: the CGD paper's (see the base).
_base_ = './_base_/retinanet_cgd_paper.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='CompactGlobalDescriptor', mode='cascade'),
         position='after_conv1_pre_norm'),
]))
