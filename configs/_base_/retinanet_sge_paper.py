# The SGE paper's recipe for RetinaNet (mmdetection 0.6, 8 GPUs): 24 epochs with lr steps at
# 16 and 22, SGD lr 0.01 for 2 images/GPU x 8, warm-up from 1/3 over 500 iterations, gradient
# clipping at norm 35; the rest is mmdet's already. Its BAM, CBAM and R101 rows train with
# 1 image/GPU at the same lr (set in those configs).
# Not matched: mmdetection 0.6's box conventions (+1-pixel boxes and anchors), which mmdet 3.x
# keeps only to evaluate old checkpoints (mmdet::legacy_1.x); these configs train mmdet 3.x's head.
_base_ = './retinanet.py'

train_cfg = dict(max_epochs=24)
param_scheduler = [
    dict(type='LinearLR', start_factor=1 / 3, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=24, by_epoch=True, milestones=[16, 22], gamma=0.1),
]
optim_wrapper = dict(clip_grad=dict(max_norm=35, norm_type=2))
