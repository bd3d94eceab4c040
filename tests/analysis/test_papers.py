import pytest

from mmattn.analysis.papers import (
    DETECTION_BACKBONES,
    IMAGENET_CLASSIFIERS,
    block_name,
    paper_figure,
)


@pytest.mark.parametrize('key, params_m, gflops', [
    ((None, 50), 23.51, 88.032),
    (('SGE', 50), 23.51, 88.149),
    (('SE', 50), 26.04, 88.152),
    ((None, 101), 42.50, 167.908),
])
def test_detection_figures_are_the_papers(key, params_m, gflops):
    figure = DETECTION_BACKBONES[key]
    assert (figure.params_m, figure.gflops) == (params_m, gflops)


def test_imagenet_figures_carry_accuracy():
    figure = IMAGENET_CLASSIFIERS[('SGE', 50)]
    assert (figure.params_m, figure.gflops, figure.top1, figure.top5) == (
        25.56, 4.127, 77.584, 93.664)


def test_block_name_from_plugin_types():
    assert block_name(set()) is None
    assert block_name({'SpatialGroupEnhance'}) == 'SGE'
    assert block_name({'SqueezeExcitation', 'SpatialGroupEnhance'}) == 'SE+SGE'


def test_paper_figure_is_none_without_a_published_row():
    assert paper_figure('GSoP', 50) is None
    assert paper_figure('SGE', 101, 'classification').top1 == 78.798
