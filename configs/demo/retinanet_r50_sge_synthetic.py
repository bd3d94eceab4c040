# The demo's SGE RetinaNet. The paper's 64 groups give 4 channels per group in stage 1 of ResNet-50;
# at base_channels=16 the same 4 channels per group (and 8, 16, 32 in stages 2-4) take 16 groups.
_base_ = './retinanet_r50_synthetic.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='SpatialGroupEnhance', groups=16), position='after_conv3'),
]))
