# Cascade R-CNN R50-FPN, the baseline of the SGE paper's tables, on its recipe (see the base).
_base_ = './_base_/cascade_rcnn_sge_paper.py'
