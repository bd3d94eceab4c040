import json
import pathlib
import struct

import pytest

from mmattn.analysis import (
    ResultError,
    compare,
    comparison_table,
    load_metafile,
    plot_gains,
    read_result,
)
from mmattn.analysis.compare import COLUMNS

ROOT = pathlib.Path(__file__).resolve().parents[2]
METAFILE = """
Models:
  - Name: retinanet_r50
    Config: configs/retinanet_r50.py
    Results:
      - Task: Object Detection
        Dataset: COCO
        Metrics: {AP_S: 19.9, AP_M: 39.6, AP_L: 48.3}
  - Name: retinanet_r50_sge
    Config: configs/retinanet_r50_sge.py
    Results:
      - Task: Object Detection
        Dataset: COCO
        Metrics: {box AP_S: 21.8, box AP_M: 41.2, box AP_L: 49.9}
      - Task: Instance Segmentation
        Dataset: COCO
        Metrics: {mask AP: 30.0}
"""
MMDET = {'coco/bbox_mAP': 0.361, 'coco/bbox_mAP_50': 0.553, 'coco/bbox_mAP_75': 0.385,
         'coco/bbox_mAP_s': 0.198, 'coco/bbox_mAP_m': 0.397, 'coco/bbox_mAP_l': -1.0,
         'coco/bbox_mAP_copypaste': '0.361 0.553 0.385 0.198 0.397 -1.000'}
OURS = {'AP': 37.3, 'AP50': 57.1, 'AP75': 40.0, 'AP_S': 21.6, 'AP_M': 40.9, 'AP_L': 49.2}


def write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def png_size(path) -> tuple[int, int]:
    with open(path, 'rb') as file:
        header = file.read(24)
    assert header[:8] == b'\x89PNG\r\n\x1a\n' and header[12:16] == b'IHDR'
    return struct.unpack('>II', header[16:24])


def test_mmdet_keys_become_percent_and_missing_buckets_none(tmp_path):
    (tmp_path / 'setup.py').write_text('')  # not a work dir: no config name from here
    result = read_result(write_json(tmp_path / 'r50.json', MMDET))
    assert result.name == 'r50'
    assert result.metrics['AP'] == pytest.approx(36.1)
    assert result.metrics['AP_L'] is None


def test_a_plain_json_names_its_config(tmp_path):
    result = read_result(write_json(tmp_path / 'x.json', {**OURS, 'config': 'a/retinanet_x.py'}))
    assert result.name == 'retinanet_x'
    assert result.metrics == OURS


def test_metafile_keyed_by_config_detection_metrics_only(tmp_path):
    metafile = tmp_path / 'metafile.yml'
    metafile.write_text(METAFILE)
    papers = load_metafile(str(metafile))
    assert papers['retinanet_r50_sge'] == dict(AP=None, AP50=None, AP75=None, AP_S=21.8,
                                               AP_M=41.2, AP_L=49.9)


def test_gains_against_the_chosen_baseline_and_the_papers(tmp_path):
    base = read_result(write_json(tmp_path / 'b.json', MMDET), 'retinanet_r50')
    sge = read_result(write_json(tmp_path / 's.json', OURS), 'retinanet_r50_sge')
    metafile = tmp_path / 'metafile.yml'
    metafile.write_text(METAFILE)
    comparison = compare([sge, base], 'retinanet_r50', load_metafile(str(metafile)))
    first, second = comparison.rows
    assert first.name == 'retinanet_r50'
    assert second.delta['AP'] == pytest.approx(37.3 - 36.1)
    assert second.delta['AP_L'] is None  # the baseline has no large objects
    assert second.paper_delta['AP_S'] == pytest.approx(1.9)
    assert second.paper['AP'] is None
    table = comparison_table(comparison)
    assert '| retinanet_r50_sge | paper | - | - | - | 21.8 (+1.9) | 41.2 (+1.6) | 49.9 (+1.6) |' \
        in table


def test_unknown_baseline_names_the_results(tmp_path):
    result = read_result(write_json(tmp_path / 'a.json', OURS))
    with pytest.raises(ResultError, match="'b' is none of the results: a"):
        compare([result], 'b')


def test_a_file_without_box_ap_says_so(tmp_path):
    with pytest.raises(ResultError, match='no record with COCO box AP'):
        read_result(write_json(tmp_path / 'loss.json', {'loss': 1.0, 'step': 2}))


def test_reads_the_validation_of_a_training_work_dir(trained):
    work_dir = trained['work_dirs']['retinanet_r50_sge_synthetic']
    result = read_result(str(work_dir))
    assert result.name == 'retinanet_r50_sge_synthetic'
    assert 'val, epoch 1' in result.source
    assert set(result.metrics) == set(COLUMNS)


def test_compare_tool_on_two_trained_runs(trained, run_tool, tmp_path):
    work_dirs = trained['work_dirs']
    png = tmp_path / 'gains.png'
    output = run_tool('compare.py', work_dirs['retinanet_r50_sge_synthetic'],
                      work_dirs['retinanet_r50_synthetic'], '--baseline',
                      'retinanet_r50_synthetic', '--out-png', png, '--metafile',
                      tmp_path / 'missing.yml')
    assert "No metafile" in output
    rows = [line for line in output.splitlines() if line.startswith('| retinanet_r50')]
    assert [row.split(' | ')[:2] for row in rows] == [
        ['| retinanet_r50_synthetic (baseline)', 'ours'],
        ['| retinanet_r50_synthetic (baseline)', 'paper'],
        ['| retinanet_r50_sge_synthetic', 'ours'],
        ['| retinanet_r50_sge_synthetic', 'paper']]
    base = read_result(str(work_dirs['retinanet_r50_synthetic'])).metrics
    sge = read_result(str(work_dirs['retinanet_r50_sge_synthetic'])).metrics
    ap = f"{sge['AP']:.1f} ({sge['AP'] - base['AP']:+.1f})"
    assert rows[2].split(' | ')[2] == ap
    assert rows[3].endswith('| - | - | - | - | - | - |')
    width, height = png_size(png)
    assert width >= 600 and height >= 400


def test_chart_needs_a_second_result(tmp_path):
    comparison = compare([read_result(write_json(tmp_path / 'a.json', OURS))])
    with pytest.raises(ResultError, match='second result'):
        plot_gains(comparison, str(tmp_path / 'x.png'))


def test_newest_run_of_a_work_dir_wins_and_test_dumps_are_read(tmp_path):
    work_dir = tmp_path / 'work'
    for stamp, ap in (('20260101_000000', 0.30), ('20260102_000000', 0.35)):
        (work_dir / stamp).mkdir(parents=True)
        write_json(work_dir / stamp / f'{stamp}.json', {**MMDET, 'coco/bbox_mAP': ap})
    (work_dir / 'retinanet_r50_sge.py').write_text('')
    result = read_result(str(work_dir))
    assert result.name == 'retinanet_r50_sge'
    assert result.metrics['AP'] == pytest.approx(35.0)
    assert result.source.startswith('test: ')


@pytest.mark.skipif(not (ROOT / 'configs/metafile.yml').is_file(), reason='no metafile yet')
def test_the_repository_metafile_holds_the_sge_retinanet_row():
    papers = load_metafile(str(ROOT / 'configs/metafile.yml'))
    assert papers['retinanet_r50_sge']['AP_S'] == 21.8
