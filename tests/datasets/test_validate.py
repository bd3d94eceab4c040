"""Bad COCO annotation files are rejected with the file and record named, or filtered and counted.

The policy is mmattn.datasets.validate's (and the README's "Bad data" table). A fuzzer then
checks the promise behind it: every file that passes loads in mmdet and runs through the training
pipeline without an error and without a non-finite box, and the boxes mmdet keeps are exactly
those the report does not count as dropped.
"""
from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

from mmattn.datasets import CLASSES, make_synthetic_coco
from mmattn.datasets.validate import (
    OUTSIDE,
    ZERO_SIZE,
    AnnotationError,
    validate_coco,
    validate_dataset_config,
)


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp('coco')
    make_synthetic_coco(root, seed=3, num_train=3, num_val=1, image_size=(128, 128))
    coco = json.loads((root / 'annotations/instances_train.json').read_text())
    return root, coco


def write(root, coco, text: str | None = None):
    path = root / 'annotations' / f'case_{random.getrandbits(32)}.json'
    path.write_text(json.dumps(coco) if text is None else text)
    return path


def check(root, coco, text=None, classes=CLASSES):
    return validate_coco(str(write(root, coco, text)), str(root / 'train'), classes)


def mutated(coco, change):
    coco = copy.deepcopy(coco)
    change(coco)
    return coco


def first_ann(key, value):
    return lambda coco: coco['annotations'][0].__setitem__(key, value)


def first_image(key, value):
    return lambda coco: coco['images'][0].__setitem__(key, value)


def duplicate_first(section):
    return lambda coco: coco[section].append(copy.deepcopy(coco[section][0]))


REJECTED = [
    ('NaN coordinate', first_ann('bbox', [math.nan, 3.0, 20.0, 20.0]),
     r"annotations\[0\] \(id=1, image_id=1\): bbox=\[nan, 3\.0, 20\.0, 20\.0\] has NaN or "
     'infinite coordinates'),
    ('infinite size', first_ann('bbox', [3.0, 3.0, math.inf, 20.0]), 'NaN or infinite'),
    ('three numbers', first_ann('bbox', [3.0, 3.0, 20.0]), r'expected \[x, y, width, height\]'),
    ('a string', first_ann('bbox', ['3', 3.0, 20.0, 20.0]), r'expected \[x, y, width, height\]'),
    ('unknown category', first_ann('category_id', 99),
     r"annotations\[0\] \(id=1, image_id=1\): category_id=99 is not declared in 'categories'"),
    ('unknown image', first_ann('image_id', 999), 'refers to an image id that no image record'),
    ('no area', lambda coco: coco['annotations'][0].pop('area'), r'area=None; a finite number'),
    ('duplicate annotation id', duplicate_first('annotations'), 'duplicate annotation id'),
    ('duplicate image id', duplicate_first('images'), r'images\[3\] \(id=1\): duplicate image id'),
    ('image without height', lambda coco: coco['images'][0].pop('height'),
     r'images\[0\] \(id=1\): width=128, height=None; both must be positive'),
    ('missing image file', first_image('file_name', 'gone.png'),
     r"images\[0\] \(id=1\): image file '.*train/gone\.png' does not exist"),
    ('no images list', lambda coco: coco.pop('images'), "'images' is missing"),
]


@pytest.mark.parametrize('change, message', [case[1:] for case in REJECTED],
                         ids=[case[0] for case in REJECTED])
def test_bad_records_are_rejected_naming_file_record_and_problem(synthetic, change, message):
    root, coco = synthetic
    with pytest.raises(AnnotationError, match=message) as rejected:
        check(root, mutated(coco, change))
    assert str(rejected.value).startswith(str(root / 'annotations' / 'case_'))


def test_malformed_json_is_rejected_with_its_position(synthetic):
    root, coco = synthetic
    text = json.dumps(coco)
    with pytest.raises(AnnotationError, match=r'case_\d+\.json: malformed JSON at line 1, '
                       r'column \d+: '):
        check(root, coco, text=text[:100])


def test_class_names_missing_from_the_categories_are_rejected(synthetic):
    root, coco = synthetic
    with pytest.raises(AnnotationError, match=r"metainfo\.classes \['circle'\] are not among"):
        check(root, coco, classes=('square', 'circle'))


def test_problems_beyond_the_first_five_are_counted(synthetic):
    root, coco = synthetic
    broken = mutated(coco, lambda c: [a.__setitem__('bbox', [math.nan] * 4)
                                      for a in c['annotations']])
    with pytest.raises(AnnotationError, match=rf"and {len(coco['annotations']) - 5} more"):
        check(root, broken)


FILTERED = [
    ('zero width', first_ann('bbox', [3.0, 3.0, 0.0, 20.0]), {ZERO_SIZE: 1}, 0),
    ('negative height', first_ann('bbox', [3.0, 3.0, 20.0, -4.0]), {ZERO_SIZE: 1}, 0),
    ('zero area', first_ann('area', 0), {ZERO_SIZE: 1}, 0),
    ('entirely outside', first_ann('bbox', [140.0, 3.0, 20.0, 20.0]), {OUTSIDE: 1}, 0),
    ('partly outside', first_ann('bbox', [120.0, 3.0, 20.0, 20.0]), {}, 1),
]


@pytest.mark.parametrize('change, dropped, partly_outside', [case[1:] for case in FILTERED],
                         ids=[case[0] for case in FILTERED])
def test_boxes_mmdet_drops_are_counted(synthetic, change, dropped, partly_outside):
    root, coco = synthetic
    report = check(root, mutated(coco, change))
    assert report.dropped == dropped
    assert report.partly_outside == partly_outside
    assert report.num_boxes == len(coco['annotations'])


def test_the_summary_line_says_what_is_dropped(synthetic):
    root, coco = synthetic
    report = check(root, mutated(coco, first_ann('bbox', [3.0, 3.0, 0.0, 20.0])))
    assert report.summary().endswith(
        f"3 images, {len(coco['annotations'])} boxes; dropped (as mmdet does): 1 box of zero or "
        'negative size.')


# ---------------------------------------------------------------------------------------------
# Fuzzing: pass => mmdet loads it and trains on finite boxes, with the counts as reported


def _random_change(rng: random.Random):
    def ann(coco):
        return rng.choice(coco['annotations']) if coco['annotations'] else {}

    def image(coco):
        return rng.choice(coco['images'])

    weird = [math.nan, math.inf, -math.inf, 0, -5, 0.5, 1e6, 'x', None, True, [1]]
    # Boxes anywhere, of any size: mostly files that pass, with boxes mmdet drops or clips.
    geometry = [
        lambda c: ann(c).__setitem__('bbox', [rng.uniform(-200, 300), rng.uniform(-200, 300),
                                              rng.uniform(-10, 200), rng.uniform(-10, 200)]),
        lambda c: ann(c)['bbox'].__setitem__(2 + rng.randrange(2), rng.choice([0, -3, 0.5])),
        lambda c: ann(c).__setitem__('area', rng.choice([0, -1, 0.5, 1e9])),
        lambda c: ann(c).__setitem__('iscrowd', 1),
    ]
    broken = [
        lambda c: ann(c)['bbox'].__setitem__(rng.randrange(4), rng.choice(weird)),
        lambda c: ann(c).__setitem__('area', rng.choice(weird)),
        lambda c: ann(c).__setitem__('category_id', rng.choice([0, 5, 99, '1', None])),
        lambda c: ann(c).__setitem__('image_id', rng.choice([0, 999, '1', None])),
        lambda c: ann(c).pop(rng.choice(['bbox', 'area', 'id', 'category_id', 'image_id']), 0),
        lambda c: image(c).pop(rng.choice(['file_name', 'width', 'height', 'id']), 0),
        lambda c: image(c).__setitem__(rng.choice(['width', 'height']), rng.choice(weird)),
        lambda c: image(c).__setitem__('file_name', rng.choice(['gone.png', '', 7])),
        lambda c: c['annotations'].append(copy.deepcopy(ann(c))),
        lambda c: c['categories'].append({'id': 1, 'name': 'square'}),
        lambda c: c['annotations'].clear(),
        lambda c: c.pop(rng.choice(['images', 'annotations', 'categories'])),
        lambda c: c.__setitem__(rng.choice(['images', 'annotations']), {}),
    ]
    return rng.choice(geometry if rng.random() < 0.6 else broken)


def _mmdet_boxes(ann_file, root) -> list[torch.Tensor]:
    """The boxes mmdet's CocoDataset and the tiny training pipeline make of the file."""
    from mmdet.datasets import CocoDataset
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    dataset = CocoDataset(
        ann_file=str(ann_file), data_prefix=dict(img=str(root / 'train') + '/'),
        metainfo=dict(classes=CLASSES), filter_cfg=None,
        pipeline=[dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
                  dict(type='Resize', scale=(64, 64), keep_ratio=True),
                  dict(type='RandomFlip', prob=0.5), dict(type='PackDetInputs')])
    samples = [dataset[i]['data_samples'] for i in range(len(dataset))]
    # Crowd boxes (iscrowd=1) are kept as ignored regions.
    return [instances.bboxes.tensor for sample in samples
            for instances in (sample.gt_instances, sample.ignored_instances)]


@pytest.mark.parametrize('seed', range(25))
def test_fuzzed_files_are_rejected_or_train_on_what_the_report_says(synthetic, seed):
    root, coco = synthetic
    rng = random.Random(seed)
    broken = copy.deepcopy(coco)
    for _ in range(rng.randint(1, 3)):
        try:
            _random_change(rng)(broken)
        except (IndexError, KeyError, TypeError, AttributeError):
            pass  # the part to change is gone already
    text = json.dumps(broken)
    if rng.random() < 0.15:
        text = text[:rng.randrange(len(text))]
    ann_file = write(root, broken, text)
    try:
        report = validate_coco(str(ann_file), str(root / 'train'), CLASSES)
    except AnnotationError as err:
        assert str(err).startswith(str(ann_file))
        return
    boxes = _mmdet_boxes(ann_file, root)
    assert sum(len(b) for b in boxes) == report.num_boxes - sum(report.dropped.values())
    assert all(torch.isfinite(b).all() for b in boxes)


def test_only_coco_datasets_of_local_files_are_checked():
    assert validate_dataset_config(dict(type='ImageNet', ann_file='meta/train.txt')) is None
