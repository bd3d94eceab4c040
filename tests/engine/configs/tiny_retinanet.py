# The demo RetinaNet (ResNet-50 at base_channels=16) on 128x128 synthetic images resized to 64x64,
# deterministic: a few iterations take seconds on 2 CPU cores, for the reliability tests.
_base_ = '../../../configs/demo/retinanet_r50_synthetic.py'

image_scale = (64, 64)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),  # draws from numpy's generator: resume must restore it
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
model = dict(bbox_head=dict(stacked_convs=1))
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=2, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
max_epochs = 3
# Validation after every epoch: it must not change what training draws from the random generators.
train_cfg = dict(max_epochs=max_epochs, val_interval=1)
param_scheduler = [
    dict(type='LinearLR', start_factor=1 / 3, by_epoch=False, begin=0, end=4),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[2], gamma=0.1),
]
# A checkpoint every 2 iterations (3 per epoch): resumes land inside epochs as well as at their
# ends; two kept, so a corrupt newest one has a predecessor.
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(by_epoch=False, interval=2, max_keep_ckpts=2))
randomness = dict(seed=0, deterministic=True)
