# GSoP-Net1 ResNet-50: GSoP channel attention (att_dim 128) after conv3 + bn3 of the LAST bottleneck of each
# stage only, and stage 4 at stride 1 (14x14 at 224), as the authors train it on ImageNet.
# Targets (GSoP README, errors 22.02/5.88): top-1 77.98, top-5 94.12, 28.29M params (authors' layer shapes).
# Recipe of the authors' main.py + train.sh: SGD lr 0.1, momentum 0.9, weight decay 1e-4, 384 images per
# step, 95 epochs, lr x0.1 after epochs 30, 60 and 90 (the base's), RandomResizedCrop 224 + flip.
_base_ = './resnet50.py'

model = dict(backbone=dict(
    strides=(1, 2, 2, 1),
    plugins=[
        dict(cfg=dict(type='GlobalSecondOrderPooling', mode='channel', att_dim=128),
             position='after_conv3', blocks='last'),
    ]))

train_dataloader = dict(batch_size=48)  # 8 GPUs x 48 = the authors' 384 images per step
train_cfg = dict(max_epochs=95)
# The authors keep lr 0.1 at 384 images per step.
auto_scale_lr = dict(base_batch_size=384)
