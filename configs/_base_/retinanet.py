# RetinaNet R50-FPN on COCO 2017 with mmattn's backbone, on mmdet's standard 1x recipe:
# 12 epochs, lr steps at 8 and 11, SGD lr 0.01 (momentum 0.9, wd 1e-4) for 16 images (2 per GPU
# x 8), warm-up from 1/1000 over 500 iterations, 1333x800, flip 0.5, frozen_stages=1, norm_eval.
# The GSoP, ECA and GC rows train with it as it is; retinanet_sge_paper.py and
# retinanet_cgd_paper.py change the recipe for the rows of those papers.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'  # with its TTA: tools/test.py --tta

custom_imports = dict(imports=['mmattn'], allow_failed_imports=False)

# AttnResNet in every config, the baselines included: it is mmdet's ResNet (same layers, weight
# names and freezing) plus the placements CGD, GSoP and BAM need, so a block's config differs from
# its baseline in `plugins` only, never in the backbone class.
# ImageNet weights: torchvision's, as in mmdet. The papers started each attention backbone from the
# authors' ImageNet checkpoint; convert one with tools/convert_checkpoint.py and start from it with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH model.backbone.init_cfg.prefix=backbone.
model = dict(backbone=dict(type='AttnResNet'))
