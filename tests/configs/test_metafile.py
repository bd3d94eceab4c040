"""configs/metafile.yml: one model-index entry per detection config, carrying exactly the COCO
numbers papers.md gives (written out here from papers.md, independently of the metafile)."""
import pathlib

import modelindex
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ROOT / 'configs'
METAFILE = CONFIGS / 'metafile.yml'

SGE_PAPER = 'https://arxiv.org/abs/1905.09646'
CGD_PAPER = 'https://arxiv.org/abs/1907.09665'


def ap(ap: float, ap50: float, ap75: float) -> dict:
    return {'box AP': ap, 'box AP50': ap50, 'box AP75': ap75}


def by_size(small: float, medium: float, large: float) -> dict:
    return {'box AP_S': small, 'box AP_M': medium, 'box AP_L': large}


# config: (metrics, papers.md section, paper)
PAPERS_MD = {
    # 1.1: SGE paper, two-stage detectors (AP, AP50, AP75)
    'faster_rcnn_r50': (ap(37.5, 59.1, 40.6), '1.1', SGE_PAPER),
    'faster_rcnn_r50_sge': (ap(38.7, 60.8, 41.7), '1.1', SGE_PAPER),
    'cascade_rcnn_r50': (ap(41.1, 59.3, 44.8), '1.1', SGE_PAPER),
    'cascade_rcnn_r50_sge': (ap(42.6, 61.4, 46.2), '1.1', SGE_PAPER),
    'faster_rcnn_r101': (ap(39.4, 60.7, 43.0), '1.1', SGE_PAPER),
    'faster_rcnn_r101_se': (ap(40.4, 61.9, 44.2), '1.1', SGE_PAPER),
    'faster_rcnn_r101_sge': (ap(41.0, 63.0, 44.3), '1.1', SGE_PAPER),
    'cascade_rcnn_r101': (ap(42.6, 60.9, 46.4), '1.1', SGE_PAPER),
    'cascade_rcnn_r101_se': (ap(43.4, 62.2, 47.2), '1.1', SGE_PAPER),
    'cascade_rcnn_r101_sge': (ap(44.4, 63.2, 48.4), '1.1', SGE_PAPER),
    # 1.2: SGE paper, RetinaNet R50-FPN (APS, APM, APL; overall AP unpublished)
    'retinanet_r50': (by_size(19.9, 39.6, 48.3), '1.2', SGE_PAPER),
    'retinanet_r50_se': (by_size(20.7, 41.3, 50.0), '1.2', SGE_PAPER),
    'retinanet_r50_bam': (by_size(19.6, 40.1, 49.9), '1.2', SGE_PAPER),
    'retinanet_r50_cbam': (by_size(21.8, 40.8, 49.5), '1.2', SGE_PAPER),
    'retinanet_r50_sge': (by_size(21.8, 41.2, 49.9), '1.2', SGE_PAPER),
    # 1.3: CGD paper, Faster R-CNN R50-FPN + CGD, bbox
    'faster_rcnn_r50_cgd': (ap(37.9, 60.3, 40.7) | by_size(23.0, 42.0, 48.0), '1.3', CGD_PAPER),
}


@pytest.fixture(scope='module')
def models() -> dict[str, dict]:
    entries = yaml.safe_load(METAFILE.read_text())['Models']
    names = [entry['Name'] for entry in entries]
    assert len(names) == len(set(names)), 'a config has two metafile entries'
    return {entry['Name']: entry for entry in entries}


def detection_configs() -> list[str]:
    """Every config of configs/ itself (not _base_/, demo/ or pretrain/)."""
    return sorted(path.stem for path in CONFIGS.glob('*.py'))


def test_every_config_has_exactly_one_entry_and_vice_versa(models):
    assert sorted(models) == detection_configs()
    for name, entry in models.items():
        assert entry['Config'] == f'configs/{name}.py'


def test_every_model_is_in_a_declared_collection(models):
    collections = {c['Name'] for c in yaml.safe_load(METAFILE.read_text())['Collections']}
    assert {entry['In Collection'] for entry in models.values()} <= collections


@pytest.mark.parametrize('name', detection_configs())
def test_results_are_the_numbers_papers_md_gives(models, name):
    entry = models[name]
    if name not in PAPERS_MD:
        assert 'Results' not in entry
        assert entry['Results Source'].startswith('none: ')
        return
    metrics, section, paper = PAPERS_MD[name]
    [result] = entry['Results']
    assert (result['Task'], result['Dataset']) == ('Object Detection', 'COCO')
    assert result['Metrics'] == metrics
    assert f'papers.md {section}' in entry['Results Source']
    assert entry['Paper']['URL'] == paper


def test_model_index_validates():
    """The repository's model-index.yml, and the copy mmattn ships for mim and mmengine."""
    for path in (ROOT / 'model-index.yml', ROOT / 'mmattn' / '.mim' / 'model-index.yml'):
        index = modelindex.load(str(path))
        assert index.check(silent=True) == []
        assert set(detection_configs()) <= {model.name for model in index.models}
