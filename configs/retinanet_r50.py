# RetinaNet R50-FPN, the baseline of the SGE paper's tables, on its recipe (see the base).
_base_ = './_base_/retinanet_sge_paper.py'
