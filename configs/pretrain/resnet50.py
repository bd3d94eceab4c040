# ResNet-50 on ImageNet with the PytorchInsight (PI) recipe; the base of every config in this folder.
# Targets (PI, papers.md §2): top-1 76.384, top-5 92.908, 25.56M params.
# mmpretrain's resnet50_8xb32_in1k already is the PI recipe: 100 epochs, SGD lr 0.1 divided by 10 after
# epochs 30, 60 and 90, momentum 0.9, weight decay 1e-4 on all parameters, 256 images per step (8 GPUs x 32),
# RandomResizedCrop 224 + flip; tested at 256 short side + 224 centre crop from data/imagenet.
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'

custom_imports = dict(imports=['mmattn'], allow_failed_imports=False)

# AttnResNet replaces mmpretrain's ResNet whole, so no mmpretrain-only argument reaches mmdet's ResNet.
model = dict(
    backbone=dict(
        _delete_=True,
        type='AttnResNet',
        depth=50,
        out_indices=(3, ),
        style='pytorch',
        # mmdet's default norm_eval=True keeps every BN in eval mode (a detector's frozen BN): from scratch,
        # nothing would normalise and the features blow up (std ~30 at init instead of ~0.1).
        norm_eval=False,
        # The authors train torchvision's ResNet, whose last BN in each block starts at 1, not 0.
        zero_init_residual=False))

# PI's lr 0.1 is for 256 images per step; --auto-scale-lr rescales it from there.
auto_scale_lr = dict(base_batch_size=256)
