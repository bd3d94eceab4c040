# SE-ResNet-101 RetinaNet: retinanet_r50_se.py at depth 101, with the SGE paper's R101 batch: 1
# image/GPU (x 8 GPUs) at the same lr.
_base_ = './retinanet_r50_se.py'

model = dict(backbone=dict(depth=101, init_cfg=dict(checkpoint='torchvision://resnet101')))
train_dataloader = dict(batch_size=1)
auto_scale_lr = dict(base_batch_size=8)
