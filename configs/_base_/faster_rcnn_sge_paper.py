# The SGE paper's recipe (mmdetection 0.6, 8 GPUs): 24 epochs with lr steps at 16 and 22, SGD lr
# 0.02 for 2 images/GPU x 8, warm-up from 1/3 over 500 iterations, gradient clipping at norm 35; the
# rest is mmdet's already. The paper trained SGE-ResNet-101 with 1 image/GPU at lr 0.01; every r101
# config of this recipe does the same, so the rows of a table share a recipe.
# Not matched: mmdetection 0.6's box conventions (+1-pixel boxes, unaligned RoIAlign, its RPN
# defaults), which mmdet 3.x keeps only to evaluate old checkpoints (mmdet::legacy_1.x); these
# configs train mmdet 3.x's heads, which score about 1 AP above mmdetection 1.x's at 1x.
_base_ = './faster_rcnn.py'

train_cfg = dict(max_epochs=24)
param_scheduler = [
    dict(type='LinearLR', start_factor=1 / 3, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=24, by_epoch=True, milestones=[16, 22], gamma=0.1),
]
optim_wrapper = dict(clip_grad=dict(max_norm=35, norm_type=2))
