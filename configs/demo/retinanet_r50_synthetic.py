# The embedded demo (`make demo`): configs/retinanet_r50.py narrowed and shortened to train on 2 CPU
# cores in minutes, on the synthetic COCO-format data mmattn writes to data/synthetic/.
# Everything below differs from the paper recipe only to fit that budget.
_base_ = '../retinanet_r50.py'

data_root = 'data/synthetic/'
classes = ('square', 'disk', 'triangle', 'cross')  # mmattn.datasets.CLASSES
image_scale = (256, 256)

# ResNet-50 at a quarter of its width (base_channels=16), from scratch: no ImageNet weights offline,
# so no frozen stage and BN in training mode.
model = dict(
    backbone=dict(base_channels=16, frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=64),
    # Anchors at half of RetinaNet's size (octave base 2): the demo images are 256 px, not 1333.
    bbox_head=dict(num_classes=len(classes), in_channels=64, feat_channels=64, stacked_convs=2,
                   anchor_generator=dict(octave_base_scale=2)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes),
                 ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes),
                 ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

# 60 short epochs (8 iterations of 8 images) and one evaluation, at the end. lr 0.01 as the
# recipe (for 8 images, not 16): from scratch, 0.02 diverged after 15 epochs.
max_epochs = 60
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
optim_wrapper = dict(optimizer=dict(lr=0.01))
param_scheduler = [
    dict(type='LinearLR', start_factor=1 / 3, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[45, 55],
         gamma=0.1),
]
default_hooks = dict(logger=dict(interval=8),
                     checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
auto_scale_lr = dict(base_batch_size=8)
