# RetinaNet R50-FPN, the SGE paper's recipe (papers.md §1.5): the baseline of its Table (APS/APM/APL).
# mmdet's 2x schedule already matches it: 24 epochs, lr steps at 16 and 22, SGD lr 0.01 for 16 images
# (2 per GPU x 8), momentum 0.9, weight decay 1e-4, 1333x800, flip 0.5, torchvision mean/std in RGB,
# frozen_stages=1, norm_eval, torchvision ImageNet weights. What differs is said below.
_base_ = [
    'mmdet::retinanet/retinanet_r50_fpn_2x_coco.py',
    'mmdet::retinanet/retinanet_tta.py',  # for tools/test.py --tta
]

custom_imports = dict(imports=['mmattn'], allow_failed_imports=False)

# The paper warms up linearly from 1/3 of the lr over 500 iterations (mmdet 3.x starts at 1/1000).
param_scheduler = [
    dict(type='LinearLR', start_factor=1 / 3, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=24, by_epoch=True, milestones=[16, 22], gamma=0.1),
]
# ... and clips gradients at norm 35.
optim_wrapper = dict(clip_grad=dict(max_norm=35, norm_type=2))
