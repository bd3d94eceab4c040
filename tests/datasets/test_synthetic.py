"""Tests for the synthetic COCO dataset generator (mmattn.datasets.synthetic)."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmattn.datasets import CLASSES, make_synthetic_coco

# Object colours are strongly saturated while background and clutter are grey;
# the generator keeps them far apart (observed: clutter <= ~25, objects >= ~100).
SAT_THRESHOLD = 50
SMALL, MEDIUM = 32**2, 96**2
SPLITS = ('train', 'val')


def _read_rgb(path: Path) -> np.ndarray:
    """Decode a PNG as an RGB uint8 array with whichever backend is installed."""
    try:
        import cv2
    except ImportError:
        from PIL import Image

        return np.asarray(Image.open(path).convert('RGB'))
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return bgr[:, :, ::-1]


def _load(summary: dict[str, Any], split: str) -> dict[str, Any]:
    return json.loads(Path(summary[split]['ann_file']).read_text())


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob('*') if p.is_file())


def _saturation(rgb: np.ndarray) -> np.ndarray:
    as_int = rgb.astype(np.int16)
    return as_int.max(axis=2) - as_int.min(axis=2)


@pytest.fixture(scope='module')
def default_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The default-argument dataset, shared by read-only tests."""
    return make_synthetic_coco(tmp_path_factory.mktemp('synthetic'))


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_identical_json_and_pixels(tmp_path: Path) -> None:
    a = make_synthetic_coco(tmp_path / 'a', seed=3, num_train=6, num_val=3)
    b = make_synthetic_coco(tmp_path / 'b', seed=3, num_train=6, num_val=3)
    for split in SPLITS:
        assert Path(a[split]['ann_file']).read_bytes() == Path(b[split]['ann_file']).read_bytes()
        names = sorted(p.name for p in Path(a[split]['img_dir']).glob('*.png'))
        assert names == sorted(p.name for p in Path(b[split]['img_dir']).glob('*.png'))
        for name in names:
            img_a = _read_rgb(Path(a[split]['img_dir']) / name)
            np.testing.assert_array_equal(img_a, _read_rgb(Path(b[split]['img_dir']) / name))


def test_different_seed_gives_different_data(tmp_path: Path) -> None:
    a = make_synthetic_coco(tmp_path / 'a', seed=0, num_train=4, num_val=2)
    b = make_synthetic_coco(tmp_path / 'b', seed=1, num_train=4, num_val=2)
    assert _load(a, 'train')['annotations'] != _load(b, 'train')['annotations']
    img_a = _read_rgb(Path(a['train']['img_dir']) / '000000.png')
    img_b = _read_rgb(Path(b['train']['img_dir']) / '000000.png')
    assert not np.array_equal(img_a, img_b)


def test_train_and_val_use_different_streams(tmp_path: Path) -> None:
    s = make_synthetic_coco(tmp_path, num_train=2, num_val=2)
    train = _read_rgb(Path(s['train']['img_dir']) / '000000.png')
    val = _read_rgb(Path(s['val']['img_dir']) / '000000.png')
    assert not np.array_equal(train, val)


# ---------------------------------------------------------------- idempotence


def test_second_call_does_not_rewrite(tmp_path: Path) -> None:
    first = make_synthetic_coco(tmp_path, num_train=4, num_val=2)
    before = {p: p.stat().st_mtime_ns for p in _all_files(tmp_path)}
    time.sleep(0.01)  # make a rewrite observable even on coarse-mtime filesystems
    second = make_synthetic_coco(tmp_path, num_train=4, num_val=2)
    after = {p: p.stat().st_mtime_ns for p in _all_files(tmp_path)}
    assert first['generated'] is True
    assert second['generated'] is False
    assert before == after
    assert {k: v for k, v in first.items() if k != 'generated'} == {
        k: v for k, v in second.items() if k != 'generated'
    }


def test_changed_parameters_regenerate_and_remove_only_own_stale_files(tmp_path: Path) -> None:
    make_synthetic_coco(tmp_path, seed=0, num_train=6, num_val=2)
    user_file = tmp_path / 'train' / 'notes.txt'
    user_file.write_text('keep me')
    summary = make_synthetic_coco(tmp_path, seed=5, num_train=4, num_val=2)
    assert summary['generated'] is True
    train = _load(summary, 'train')
    expected = {'seed': 5, 'num_train': 4, 'num_val': 2, 'image_size': [256, 256]}
    assert train['info']['params'] == expected
    pngs = sorted(p.name for p in (tmp_path / 'train').glob('*.png'))
    assert pngs == [f'{i:06d}.png' for i in range(4)]
    assert user_file.read_text() == 'keep me'
    # The regenerated dataset equals a fresh one made with the same arguments.
    fresh = make_synthetic_coco(tmp_path / 'fresh', seed=5, num_train=4, num_val=2)
    regenerated = Path(summary['train']['ann_file']).read_bytes()
    assert regenerated == Path(fresh['train']['ann_file']).read_bytes()


def test_missing_image_triggers_regeneration(tmp_path: Path) -> None:
    make_synthetic_coco(tmp_path, num_train=3, num_val=2)
    missing = tmp_path / 'val' / '000001.png'
    missing.unlink()
    summary = make_synthetic_coco(tmp_path, num_train=3, num_val=2)
    assert summary['generated'] is True
    assert missing.is_file()


def test_no_temporary_files_left_behind(tmp_path: Path) -> None:
    make_synthetic_coco(tmp_path, num_train=3, num_val=2)
    assert [p for p in _all_files(tmp_path) if p.name.endswith('.tmp')] == []


# ---------------------------------------------------------------- content


def test_annotations_are_valid_coco(default_dataset: dict[str, Any]) -> None:
    for split in SPLITS:
        coco = _load(default_dataset, split)
        assert [c['id'] for c in coco['categories']] == list(range(1, len(CLASSES) + 1))
        assert tuple(c['name'] for c in coco['categories']) == CLASSES
        images = {img['id']: img for img in coco['images']}
        assert len(images) == len(coco['images'])
        for img in coco['images']:
            assert img['file_name'] == Path(img['file_name']).name  # relative to the split folder
            assert _read_rgb(Path(default_dataset[split]['img_dir']) / img['file_name']).shape == (
                img['height'],
                img['width'],
                3,
            )
        ann_ids = [ann['id'] for ann in coco['annotations']]
        assert len(set(ann_ids)) == len(ann_ids)
        assert min(ann_ids) == 1
        for ann in coco['annotations']:
            img = images[ann['image_id']]
            x, y, w, h = ann['bbox']
            assert all(isinstance(v, float) for v in ann['bbox'])
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= img['width'] and y + h <= img['height']
            assert ann['area'] == w * h
            assert 1 <= ann['category_id'] <= len(CLASSES)
            assert ann['iscrowd'] == 0
        # Every image has at least one object (mmdet filters empty images).
        assert {ann['image_id'] for ann in coco['annotations']} == set(images)


def _isolated_objects(
    summary: dict[str, Any], num_images: int
) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """``(image, annotation)`` pairs whose box, grown by 3 px, meets no other box.

    Inside such a neighbourhood every saturated pixel belongs to that object,
    which lets the tests recompute its extent and colour independently.
    """
    coco = _load(summary, 'train')
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in coco['annotations']:
        by_image.setdefault(ann['image_id'], []).append(ann)
    pairs = []
    for img in coco['images'][:num_images]:
        rgb = _read_rgb(Path(summary['train']['img_dir']) / img['file_name'])
        anns = by_image[img['id']]
        for ann in anns:
            x0, y0, x1, y1 = _grown_box(ann, 3, img['width'], img['height'])
            if not any(
                other is not ann
                and other['bbox'][0] < x1
                and other['bbox'][0] + other['bbox'][2] > x0
                and other['bbox'][1] < y1
                and other['bbox'][1] + other['bbox'][3] > y0
                for other in anns
            ):
                pairs.append((rgb, ann))
    return pairs


def _grown_box(
    ann: dict[str, Any], margin: int, width: int, height: int
) -> tuple[int, int, int, int]:
    """Integer ``(x0, y0, x1, y1)`` of the box grown by ``margin``, clipped to the image."""
    x, y, w, h = (int(v) for v in ann['bbox'])
    x0, y0 = max(0, x - margin), max(0, y - margin)
    return x0, y0, min(width, x + w + margin), min(height, y + h + margin)


def test_boxes_tightly_enclose_object_pixels(default_dataset: dict[str, Any]) -> None:
    pairs = _isolated_objects(default_dataset, 16)
    assert len(pairs) >= 30
    for rgb, ann in pairs:
        x0, y0, x1, y1 = _grown_box(ann, 3, rgb.shape[1], rgb.shape[0])
        rows, cols = np.nonzero(_saturation(rgb[y0:y1, x0:x1]) > SAT_THRESHOLD)
        found = [
            float(x0 + cols.min()),
            float(y0 + rows.min()),
            float(cols.max() - cols.min() + 1),
            float(rows.max() - rows.min() + 1),
        ]
        assert found == ann['bbox'], ann


def test_objects_show_their_class_colour_and_shape(default_dataset: dict[str, Any]) -> None:
    # Fraction of its box an object fills: square 1, disk ~pi/4, triangle ~1/2,
    # cross in between (two bars of 28-40% of the side); looser for tiny ones.
    fill_range = {
        'square': (1.0, 1.0),
        'disk': (0.74, 0.86),
        'triangle': (0.45, 0.62),
        'cross': (0.45, 0.70),
    }
    # Dominant channels per class: red, green, blue, red+green (yellow).
    hot = {'square': (0,), 'disk': (1,), 'triangle': (2,), 'cross': (0, 1)}
    seen = set()
    for rgb, ann in _isolated_objects(default_dataset, 16):
        name = CLASSES[ann['category_id'] - 1]
        x, y, w, h = (int(v) for v in ann['bbox'])
        crop = rgb[y : y + h, x : x + w]
        mask = _saturation(crop) > SAT_THRESHOLD
        low, high = fill_range[name]
        assert low <= mask.mean() <= high, (name, mask.mean(), ann)
        mean = crop[mask].astype(np.float64).mean(axis=0)
        cold = [c for c in range(3) if c not in hot[name]]
        assert min(mean[list(hot[name])]) > max(mean[cold]) + 60, (name, mean)
        seen.add(name)
    assert seen == set(CLASSES)


def test_size_buckets_populated_and_away_from_thresholds(default_dataset: dict[str, Any]) -> None:
    areas = [ann['area'] for ann in _load(default_dataset, 'train')['annotations']]
    small = sum(a < SMALL for a in areas)
    medium = sum(SMALL <= a < MEDIUM for a in areas)
    large = sum(a >= MEDIUM for a in areas)
    assert small > medium > large > 0
    assert small > 0.4 * len(areas)
    for threshold in (SMALL, MEDIUM):
        assert all(abs(a - threshold) > 0.02 * threshold for a in areas)
    expected = {'small': small, 'medium': medium, 'large': large}
    assert default_dataset['train']['size_buckets'] == expected


def test_objects_per_image_in_expected_range(default_dataset: dict[str, Any]) -> None:
    coco = _load(default_dataset, 'train')
    counts = np.bincount([ann['image_id'] for ann in coco['annotations']])[1:]
    assert counts.min() >= 1 and counts.max() <= 12
    assert 4 <= counts.mean() <= 12


def test_non_square_image_size(tmp_path: Path) -> None:
    summary = make_synthetic_coco(tmp_path, num_train=4, num_val=1, image_size=(160, 320))
    coco = _load(summary, 'train')
    assert _read_rgb(Path(summary['train']['img_dir']) / '000000.png').shape == (160, 320, 3)
    for ann in coco['annotations']:
        x, y, w, h = ann['bbox']
        assert x + w <= 320 and y + h <= 160


def test_summary_matches_files(default_dataset: dict[str, Any]) -> None:
    assert default_dataset['classes'] == CLASSES
    for split, n in (('train', 64), ('val', 16)):
        coco = _load(default_dataset, split)
        assert default_dataset[split]['num_images'] == len(coco['images']) == n
        assert default_dataset[split]['num_objects'] == len(coco['annotations'])
        assert sum(default_dataset[split]['size_buckets'].values()) == len(coco['annotations'])
        assert len(list(Path(default_dataset[split]['img_dir']).glob('*.png'))) == n


# ---------------------------------------------------------------- pycocotools


def test_pycocotools_loads_both_files(default_dataset: dict[str, Any]) -> None:
    coco_mod = pytest.importorskip('pycocotools.coco')
    for split in SPLITS:
        with contextlib.redirect_stdout(io.StringIO()):
            api = coco_mod.COCO(default_dataset[split]['ann_file'])
        assert api.getCatIds() == list(range(1, len(CLASSES) + 1))
        assert len(api.getImgIds()) == default_dataset[split]['num_images']
        assert len(api.getAnnIds()) == default_dataset[split]['num_objects']


def test_perfect_predictions_score_ap_one_in_every_bucket(default_dataset: dict[str, Any]) -> None:
    coco_mod = pytest.importorskip('pycocotools.coco')
    cocoeval_mod = pytest.importorskip('pycocotools.cocoeval')
    for split in SPLITS:
        with contextlib.redirect_stdout(io.StringIO()):
            gt = coco_mod.COCO(default_dataset[split]['ann_file'])
            keys = ('image_id', 'category_id', 'bbox')
            dets = [{**{k: a[k] for k in keys}, 'score': 1.0} for a in gt.dataset['annotations']]
            evaluator = cocoeval_mod.COCOeval(gt, gt.loadRes(dets), iouType='bbox')
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        ap, ap50, ap75, ap_s, ap_m, ap_l = evaluator.stats[:6]
        assert (ap, ap50, ap75, ap_s, ap_m, ap_l) == pytest.approx((1.0,) * 6), split


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ('kwargs', 'name'),
    [
        ({'num_train': 0}, 'num_train'),
        ({'num_val': 0}, 'num_val'),
        ({'num_train': 2.5}, 'num_train'),
        ({'seed': -1}, 'seed'),
        ({'image_size': (100, 256)}, 'image_size'),
        ({'image_size': (256,)}, 'image_size'),
        ({'image_size': (256.0, 256.0)}, 'image_size'),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(
    tmp_path: Path, kwargs: dict[str, Any], name: str
) -> None:
    with pytest.raises(ValueError, match=name) as info:
        make_synthetic_coco(tmp_path, **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing written for rejected arguments
