# BAM-ResNet-101 RetinaNet: retinanet_r50_bam.py at depth 101 (1 image/GPU, as in the SGE paper).
_base_ = './retinanet_r50_bam.py'

model = dict(backbone=dict(depth=101, init_cfg=dict(checkpoint='torchvision://resnet101')))
