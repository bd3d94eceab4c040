# The CGD paper's recipe (mmdetection, 2019) on Cascade R-CNN: 12 epochs with lr steps at 8 and 11,
# SGD lr 0.02 for 2 images/GPU x 8, warm-up over 500 iterations, and weight decay 5e-5 on the CGD
# parameters (1e-4 on the rest). The paper trained Faster and Mask R-CNN; Cascade R-CNN takes the
# same lr in mmdetection. The paper gives no warm-up ratio and no clipping: 1/3 and norm 35 are the
# defaults of the mmdetection configs it ran on (the values the SGE paper lists).
_base_ = './cascade_rcnn.py'

param_scheduler = [
    dict(type='LinearLR', start_factor=1 / 3, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    clip_grad=dict(max_norm=35, norm_type=2),
    # Every parameter of a block named `cgd` (w0..w2, bias0..bias2): 1e-4 x 0.5.
    paramwise_cfg=dict(custom_keys={'.cgd.': dict(decay_mult=0.5)}))
