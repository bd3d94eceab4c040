"""Check a COCO annotation file before training, so bad data fails in seconds with a clear message.

mmdet's ``CocoDataset`` crashes deep inside its pipeline on some broken files (a missing image, a
missing ``area``, a duplicate annotation id) and silently trains on garbage with others (NaN
coordinates, class names that match no category, annotations of undeclared categories).
:func:`validate_coco` reads the file once and applies one policy per problem:

Rejected (:class:`AnnotationError`, naming the file, the record and the problem): malformed JSON;
a file that is not a COCO dict; image records without ``id``, ``file_name`` or a positive
``width``/``height``; duplicate image, annotation or category ids; annotations of an unknown
image or an undeclared category id; a ``bbox`` that is not four numbers, or holds NaN or
infinity; a missing or non-finite ``area``; image files that do not exist; configured class names
that are not among the file's categories.

Filtered with a logged count (exactly the boxes mmdet's ``CocoDataset`` drops): boxes of zero or
negative size (width or height < 1 px, or area <= 0), and boxes entirely outside their image.
Boxes partly outside their image are kept (the pipeline clips them) and counted.
"""
from __future__ import annotations

import functools
import json
import math
import os
import os.path as osp
from collections import Counter
from dataclasses import dataclass, field
from numbers import Real

from mmattn.preflight import ConfigError

__all__ = ['AnnotationError', 'AnnotationReport', 'validate_coco']

MAX_LISTED = 5  # problems spelled out in a message; the rest are counted
# How far (px) a kept box may cross its image's border before it is counted as partly outside.
BORDER_TOLERANCE = 1.0

ZERO_SIZE = 'of zero or negative size'
OUTSIDE = 'entirely outside their image'
NOT_A_CLASS = 'of categories not in metainfo.classes (not trained)'


class AnnotationError(ConfigError):
    """An annotation file would crash training or make it train on garbage."""


@dataclass(frozen=True)
class AnnotationReport:
    """What :func:`validate_coco` found in a file that passed."""

    ann_file: str
    num_images: int
    num_boxes: int
    dropped: dict[str, int] = field(default_factory=dict)
    partly_outside: int = 0

    def summary(self) -> str:
        """One line for the log: counts of the boxes mmdet drops and of those kept but clipped."""
        text = f'{self.ann_file}: {self.num_images} images, {self.num_boxes} boxes'
        dropped = [f'{count} {"box" if count == 1 else "boxes"} {reason}'
                   for reason, count in self.dropped.items() if count]
        if dropped:
            text += '; dropped (as mmdet does): ' + ', '.join(dropped)
        if self.partly_outside:
            text += (f'; kept {self.partly_outside} boxes partly outside their image (the '
                     'pipeline clips them)')
        return text + '.'


def validate_coco(ann_file: str, img_dir: str | None = None,
                  classes: tuple[str, ...] | list[str] | None = None, *,
                  require_annotations: bool = True) -> AnnotationReport:
    """Check ``ann_file`` against the policy of this module; return the counts of what passes.

    Args:
        ann_file: A COCO detection annotation file.
        img_dir: The folder ``file_name`` is relative to; None skips the image-file check.
        classes: The class names the dataset trains (``metainfo.classes``); each must be a
            category name of the file. None skips that check.
        require_annotations: Whether the file must have an ``annotations`` list (a test-dev
            file has none).

    Raises:
        AnnotationError: One message that names the file, lists the first problems with their
            record (``annotations[12] (id=13)``) and counts the rest.
    """
    stat = os.stat(ann_file)
    return _validate_cached(osp.abspath(ann_file), stat.st_size, stat.st_mtime_ns,
                            None if img_dir is None else osp.abspath(img_dir),
                            None if classes is None else tuple(classes), require_annotations)


@functools.lru_cache(maxsize=16)
def _validate_cached(ann_file: str, size: int, mtime_ns: int, img_dir: str | None,
                     classes: tuple[str, ...] | None,
                     require_annotations: bool) -> AnnotationReport:
    # size and mtime_ns are part of the key: an edited file is checked again.
    return _Validator(ann_file, img_dir, classes, require_annotations).run()


class _Validator:
    def __init__(self, ann_file: str, img_dir: str | None, classes: tuple[str, ...] | None,
                 require_annotations: bool) -> None:
        self.ann_file = ann_file
        self.img_dir = img_dir
        self.classes = classes
        self.require_annotations = require_annotations
        self.problems: list[str] = []
        self.num_problems = 0
        self._listings: dict[str, set[str]] = {}

    def reject(self, record: str, problem: str) -> None:
        self.num_problems += 1
        if len(self.problems) < MAX_LISTED:
            self.problems.append(f'{record}: {problem}')

    def run(self) -> AnnotationReport:
        coco = self._read()
        categories = self._categories(coco.get('categories'))
        images = self._images(coco.get('images'))
        report = self._annotations(coco.get('annotations'), images, categories)
        if self.num_problems:
            more = self.num_problems - len(self.problems)
            listed = ''.join(f'\n  - {problem}' for problem in self.problems)
            raise AnnotationError(
                f'{self.ann_file}: {self.num_problems} problem(s) that would crash training or '
                f'train on garbage:{listed}' + (f'\n  ... and {more} more' if more else '')
                + '\nFix the file (or regenerate it); see "Bad data" in the README for what '
                'mmattn rejects and what it filters.')
        return report

    def _read(self) -> dict:
        try:
            with open(self.ann_file, encoding='utf-8') as f:
                coco = json.load(f)
        except json.JSONDecodeError as err:
            raise AnnotationError(
                f'{self.ann_file}: malformed JSON at line {err.lineno}, column {err.colno}: '
                f'{err.msg}. The file is truncated or was not written as JSON; regenerate '
                'it.') from None
        except UnicodeDecodeError as err:
            raise AnnotationError(f'{self.ann_file}: not UTF-8 text ({err}); a COCO annotation '
                                  'file is JSON.') from None
        if not isinstance(coco, dict):
            raise AnnotationError(f'{self.ann_file}: holds a JSON {type(coco).__name__}; a COCO '
                                  "file is an object with 'images', 'annotations' and "
                                  "'categories' lists.")
        required = ['images', 'categories'] + (['annotations'] if self.require_annotations
                                               else [])
        for key in required:
            if not isinstance(coco.get(key), list):
                found = 'is missing' if key not in coco else f'is a {type(coco[key]).__name__}'
                raise AnnotationError(f"{self.ann_file}: '{key}' {found}; a COCO detection file "
                                      f"has a list under '{key}'.")
        return coco

    def _categories(self, records: list) -> dict[int, str]:
        categories: dict[int, str] = {}
        for index, cat in enumerate(records):
            where = f'categories[{index}]'
            if not isinstance(cat, dict) or not _is_int(cat.get('id')) or not isinstance(
                    cat.get('name'), str):
                self.reject(where, "needs an integer 'id' and a string 'name'")
                continue
            if cat['id'] in categories:
                self.reject(f"{where} (id={cat['id']})", 'duplicate category id')
            categories[cat['id']] = cat['name']
        if self.classes is not None:
            names = set(categories.values())
            missing = [name for name in self.classes if name not in names]
            if missing:
                self.reject('categories', f'metainfo.classes {missing} are not among the '
                            f'category names {sorted(names)}; mmdet would train those classes '
                            "on no boxes. Set the config's metainfo.classes to the file's names.")
        return categories

    def _images(self, records: list) -> dict[int, tuple[float, float]]:
        images: dict[int, tuple[float, float]] = {}
        missing_files = 0
        for index, img in enumerate(records):
            where = f'images[{index}]'
            if not isinstance(img, dict):
                self.reject(where, 'is not an object')
                continue
            if not _is_int(img.get('id')):
                self.reject(where, f"has no integer 'id' (got {img.get('id')!r})")
                continue
            where = f"{where} (id={img['id']})"
            if img['id'] in images:
                self.reject(where, 'duplicate image id')
            width, height = img.get('width'), img.get('height')
            if not (_is_number(width) and _is_number(height) and width > 0 and height > 0):
                self.reject(where, f'width={width!r}, height={height!r}; both must be positive '
                            'numbers')
                width = height = math.inf  # keep checking its boxes without false alarms
            images[img['id']] = (width, height)
            file_name = img.get('file_name')
            if not isinstance(file_name, str) or not file_name:
                self.reject(where, f"has no 'file_name' (got {file_name!r})")
            elif self.img_dir is not None and not self._exists(file_name):
                missing_files += 1
                if missing_files <= MAX_LISTED:
                    self.reject(where, f"image file '{osp.join(self.img_dir, file_name)}' does "
                                'not exist')
                else:
                    self.num_problems += 1
        return images

    def _annotations(self, records: list | None, images: dict[int, tuple[float, float]],
                     categories: dict[int, str]) -> AnnotationReport:
        records = records or []
        dropped: Counter = Counter()
        partly_outside = 0
        seen_ids: set = set()
        trained = None if self.classes is None else set(self.classes)
        for index, ann in enumerate(records):
            where = f'annotations[{index}]'
            if not isinstance(ann, dict):
                self.reject(where, 'is not an object')
                continue
            ann_id = ann.get('id')
            where = f"{where} (id={ann_id!r}, image_id={ann.get('image_id')!r})"
            if not _is_int(ann_id):
                self.reject(where, "has no integer 'id'")
            elif ann_id in seen_ids:
                self.reject(where, 'duplicate annotation id')
            seen_ids.add(ann_id)
            if ann.get('image_id') not in images:
                self.reject(where, 'refers to an image id that no image record has')
                continue
            if ann.get('category_id') not in categories:
                self.reject(where, f"category_id={ann.get('category_id')!r} is not declared in "
                            f"'categories' (ids {sorted(categories)[:20]})")
                continue
            bbox = ann.get('bbox')
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
                self.reject(where, f'bbox={bbox!r}; expected [x, y, width, height] numbers')
                continue
            if not all(map(math.isfinite, bbox)):
                self.reject(where, f'bbox={bbox!r} has NaN or infinite coordinates')
                continue
            area = ann.get('area')
            if not _is_number(area) or not math.isfinite(area):
                self.reject(where, f"area={area!r}; a finite number is required (mmdet reads it)")
                continue
            if ann.get('ignore', False):
                continue  # mmdet skips these before looking at the box
            x, y, w, h = bbox
            width, height = images[ann['image_id']]
            if w < 1 or h < 1 or area <= 0:
                dropped[ZERO_SIZE] += 1
            elif min(x + w, width) <= max(x, 0) or min(y + h, height) <= max(y, 0):
                dropped[OUTSIDE] += 1
            elif trained is not None and categories[ann['category_id']] not in trained:
                dropped[NOT_A_CLASS] += 1
            elif (x < -BORDER_TOLERANCE or y < -BORDER_TOLERANCE
                  or x + w > width + BORDER_TOLERANCE or y + h > height + BORDER_TOLERANCE):
                partly_outside += 1
        return AnnotationReport(self.ann_file, len(images), len(records),
                                {reason: dropped[reason] for reason in
                                 (ZERO_SIZE, OUTSIDE, NOT_A_CLASS) if dropped[reason]},
                                partly_outside)

    def _exists(self, file_name: str) -> bool:
        # One listing per folder instead of a stat per image: fast on network file systems.
        folder, name = osp.split(osp.join(self.img_dir, file_name))
        if folder not in self._listings:
            self._listings[folder] = set(os.listdir(folder)) if osp.isdir(folder) else set()
        return name in self._listings[folder]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def validate_dataset_config(dataset: dict, *, require_annotations: bool = True
                            ) -> AnnotationReport | None:
    """:func:`validate_coco` for one dataset config of a dataloader, as mmdet would read it.

    Returns None (nothing checked) unless the dataset is an mmdet ``CocoDataset`` (or subclass)
    reading a local file. The classes checked are ``metainfo.classes``, or the dataset class's
    defaults (COCO's 80) when the config sets none, as mmdet does.
    """
    from mmdet.datasets import CocoDataset
    from mmengine.registry import DATASETS

    dataset_type = dataset.get('type')
    if isinstance(dataset_type, str):
        with DATASETS.switch_scope_and_registry(None) as registry:
            dataset_type = registry.get(dataset_type)
    ann_file = dataset.get('ann_file')
    backend_args = dataset.get('backend_args') or {}
    if not (isinstance(dataset_type, type) and issubclass(dataset_type, CocoDataset)
            and isinstance(ann_file, str) and ann_file.endswith('.json')
            and backend_args.get('backend', 'local') == 'local'):
        return None
    root = dataset.get('data_root') or ''
    img_dir = (dataset.get('data_prefix') or {}).get('img')
    classes = (dataset.get('metainfo') or {}).get('classes')
    if classes is None:
        classes = dataset_type.METAINFO.get('classes')
    return validate_coco(osp.join(root, ann_file),
                         None if img_dir is None else osp.join(root, img_dir),
                         classes, require_annotations=require_annotations)
