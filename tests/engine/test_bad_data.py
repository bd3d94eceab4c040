"""tools/train.py on broken annotation files: rejected before training, or filtered and counted."""
import json
import shutil

from conftest import TINY_CONFIG
from forked_tools import Tool


def train(data_root, tmp_path, *options: str) -> Tool:
    return Tool('tools/train.py', TINY_CONFIG, '--work-dir', str(tmp_path / 'work'),
                '--cfg-options', f'data_root={data_root}/', *options, log=tmp_path / 'log')


def broken_copy(tiny_data, tmp_path, change) -> tuple:
    root = tmp_path / 'data'
    shutil.copytree(tiny_data, root)
    ann_file = root / 'annotations/instances_train.json'
    coco = json.loads(ann_file.read_text())
    text = change(coco)
    ann_file.write_text(text if isinstance(text, str) else json.dumps(coco))
    return root, ann_file


def test_malformed_json_stops_training_before_it_starts(tiny_data, tmp_path):
    root, ann_file = broken_copy(tiny_data, tmp_path, lambda coco: json.dumps(coco)[:500])
    run = train(root, tmp_path)
    assert run.wait() == 1
    assert f'error: {ann_file}: malformed JSON at line 1, column' in run.output()
    assert 'Epoch(train)' not in run.output()


def test_nan_box_stops_training_naming_the_record(tiny_data, tmp_path):
    def nan_box(coco):
        coco['annotations'][2]['bbox'][1] = float('nan')
    root, ann_file = broken_copy(tiny_data, tmp_path, nan_box)
    run = train(root, tmp_path)
    assert run.wait() == 1
    assert f'error: {ann_file}: 1 problem(s)' in run.output()
    assert 'annotations[2] (id=3, image_id=1): bbox=[' in run.output()


def test_zero_size_boxes_are_dropped_and_counted_in_the_log(tiny_data, tmp_path):
    def flatten(coco):
        coco['annotations'][0]['bbox'][3] = 0
    root, _ = broken_copy(tiny_data, tmp_path, flatten)
    run = train(root, tmp_path, 'train_cfg.max_epochs=1')
    assert run.wait() == 0, run.output()[-3000:]
    assert 'boxes; dropped (as mmdet does): 1 box of zero or negative size.' in run.output()
