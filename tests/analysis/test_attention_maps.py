import pytest
from PIL import Image

from mmattn.analysis import PANELS, visualize_attention


@pytest.fixture(scope='module')
def sge_run(trained) -> tuple:
    name = 'retinanet_r50_sge_synthetic'
    image = trained['data_root'] / 'val' / '000000.png'
    return trained['configs'][name], trained['work_dirs'][name] / 'epoch_1.pth', image


@pytest.fixture(scope='module')
def default_figure(sge_run, tmp_path_factory):
    config, checkpoint, image = sge_run
    out = tmp_path_factory.mktemp('grid') / 'grid.png'
    return visualize_attention(str(config), str(checkpoint), str(image), out=str(out))


def panels(fig) -> list:
    return [ax for ax in fig.axes if ax.images]


def test_default_block_is_the_last_of_stage_3(default_figure):
    assert len(panels(default_figure)) == len(PANELS)
    assert 'layer3.5.sge' in default_figure.get_suptitle()
    assert panels(default_figure)[3].get_title() == 'SGE gate: mean over groups of sigmoid(a)'


def test_sge_gate_lies_in_0_1(default_figure):
    gate = panels(default_figure)[3].images[0].get_array()
    assert 0 < gate.min() and gate.max() < 1


def test_tool_writes_the_grid(sge_run, run_tool, tmp_path):
    config, checkpoint, image = sge_run
    out = tmp_path / 'grid.png'
    run_tool('visualize_attention.py', config, checkpoint, image, '--block', 'layer2.3.sge',
             '--out', out)
    with Image.open(out) as png:
        assert png.format == 'PNG'
        assert png.size == (1600, 440)
        assert png.info['Description'].startswith(
            'panels: image, feature norm before, feature norm after, attention')
        assert 'layer2.3.sge' in png.info['Title']


def test_a_block_that_is_not_attention_lists_the_blocks(sge_run, run_tool, tmp_path):
    config, checkpoint, image = sge_run
    with pytest.raises(SystemExit, match=r'layer3\.5\.conv1: a Conv2d, not an attention block\. '
                       r'The attention blocks are: layer1\.0\.sge, .*layer4\.2\.sge\.'):
        run_tool('visualize_attention.py', config, checkpoint, image, '--block',
                 'layer3.5.conv1', '--out', tmp_path / 'x.png')
