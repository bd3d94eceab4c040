# ResNet-101 Cascade R-CNN: cascade_rcnn_r50.py at depth 101, with the SGE paper's R101 batch: 1
# image/GPU (x 8 GPUs) at lr 0.01.
_base_ = './cascade_rcnn_r50.py'

model = dict(backbone=dict(depth=101, init_cfg=dict(checkpoint='torchvision://resnet101')))
train_dataloader = dict(batch_size=1)
optim_wrapper = dict(optimizer=dict(lr=0.01))
auto_scale_lr = dict(base_batch_size=8)
