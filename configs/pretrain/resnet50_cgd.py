# ResNet-50 + CGD (cascaded descriptor) right after conv1 of every bottleneck, before bn1.
# Targets (CGD paper, errors 23.10/6.49): top-1 76.90, top-5 93.51, ResNet-50 + 0.02M params (25.58M).
# Recipe of the authors' classification/train.sh + imagenet.py: SGD lr 0.1, momentum 0.9, 256 images per
# step, RandomResizedCrop 224 + flip, weight decay 1e-4 but 4e-5 on w0..w2 and bias0..bias2 (an early commit
# had 5e-5; the README says 4e-5), 101 epochs with lr x0.1 after epochs 31, 61 and 81 (PI: 100; 30, 60, 90).
# Not verified: that this train.sh (their CGD ResNet-50, run as `-a resnet50`) produced the paper's number.
_base_ = './resnet50.py'

model = dict(backbone=dict(plugins=[
    dict(cfg=dict(type='CompactGlobalDescriptor', mode='cascade'), position='after_conv1_pre_norm'),
]))

# A CGD block's only parameters are w0..w2 and bias0..bias2 (backbone.layer1.0.cgd.w0, ...): 0.4 x 1e-4.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'.cgd.': dict(decay_mult=0.4)}))
param_scheduler = dict(milestones=[31, 61, 81])
train_cfg = dict(max_epochs=101)
