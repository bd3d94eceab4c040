"""Deterministic synthetic COCO-format detection dataset ("embedded default data").

The generator lets a detection pipeline (mmdet ``CocoDataset`` + ``CocoMetric``)
train and evaluate with no download. Each image shows a textured background,
unannotated clutter (thin grey lines and grey/low-saturation blobs) and 4-12
annotated objects of four classes. A class is recognisable both by its shape
and by its hue, while the clutter shares neither cue, so a detector has to
learn class appearance instead of "anything that is not background".

Layout written under ``root``::

    root/train/000000.png ...
    root/val/000000.png ...
    root/annotations/instances_train.json
    root/annotations/instances_val.json

Example:
    >>> from mmattn.datasets import make_synthetic_coco
    >>> summary = make_synthetic_coco('data/synthetic')
    >>> summary['train']['num_images']
    64
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ['CLASSES', 'make_synthetic_coco']

CLASSES: tuple[str, ...] = ('square', 'disk', 'triangle', 'cross')
"""Class names in category-id order (category id = index + 1)."""

# Bumped whenever the drawing code changes, so an old dataset on disk is
# recognised as stale and regenerated instead of silently reused.
GENERATOR_VERSION = '1.0'
_GENERATOR_NAME = 'mmattn.datasets.synthetic'

# RGB base colours: one dominant hue per class and all strongly saturated, so
# that colour separates the classes and separates objects from the grey clutter.
_CLASS_RGB: tuple[tuple[int, int, int], ...] = (
    (215, 45, 45),  # square: red
    (40, 190, 60),  # disk: green
    (45, 85, 220),  # triangle: blue
    (235, 190, 35),  # cross: yellow
)

_SPLITS = ('train', 'val')
_MIN_IMAGE_SIDE = 128  # a large object (area >= 96**2) needs room to fit
_MAX_IMAGE_SIDE = 4096  # guards against accidental multi-GB allocations
_OBJECTS_PER_IMAGE = (4, 12)  # inclusive
# COCO area thresholds and the bucket drawn for each object. Large objects fail
# placement more often (two rarely fit together), so they are over-drawn; the
# placed objects end up ~1/2 small, ~1/3 medium and ~1/6 large.
_SMALL_MAX = 32.0**2
_MEDIUM_MAX = 96.0**2
_BUCKETS = ('small', 'medium', 'large')
_BUCKET_PROBS = (0.45, 0.33, 0.22)
# Areas this close (relative) to a COCO threshold are re-sampled so that a
# resize with rounding can never move an object into another bucket.
_BUCKET_MARGIN = 0.02
_MAX_IOU = 0.3
_PLACEMENT_TRIES = 60
_SIZE_TRIES = 50
_FILE_RE = re.compile(r'^\d{6}\.png$')
_PNG_COMPRESSION = 1


def make_synthetic_coco(
    root: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_train: int = 64,
    num_val: int = 16,
    image_size: tuple[int, int] = (256, 256),
) -> dict[str, Any]:
    """Write (or reuse) a synthetic COCO detection dataset under ``root``.

    The output is a pure function of the arguments: the same arguments give
    byte-identical JSON and pixel-identical PNGs. If ``root`` already holds a
    dataset made with the same arguments (recorded in each JSON's ``info``),
    nothing is rewritten. Otherwise the dataset is regenerated; only files this
    generator owns are overwritten or removed.

    Args:
        root: Output directory; created if missing.
        seed: Non-negative seed of the random generator.
        num_train: Number of training images (>= 1).
        num_val: Number of validation images (>= 1).
        image_size: ``(height, width)`` of every image, each side in
            ``[128, 4096]``.

    Returns:
        A summary dict with keys ``root`` (str), ``classes`` (tuple of names),
        ``generated`` (True if files were written by this call) and one entry
        per split (``'train'``, ``'val'``), each a dict with ``img_dir``,
        ``ann_file`` (str paths), ``num_images``, ``num_objects`` and
        ``size_buckets`` (``{'small': n, 'medium': n, 'large': n}``).

    Raises:
        ValueError: If an argument is out of range.
    """
    height, width = _check_args(seed, num_train, num_val, image_size)
    root_path = Path(root)
    counts = {'train': num_train, 'val': num_val}
    params = {
        'seed': int(seed),
        'num_train': int(num_train),
        'num_val': int(num_val),
        'image_size': [height, width],
    }
    ann_dir = root_path / 'annotations'

    existing = {split: _read_own_json(ann_dir / f'instances_{split}.json') for split in _SPLITS}
    if all(_is_current(existing[s], params, s, root_path / s) for s in _SPLITS):
        return _summary(root_path, {s: existing[s] for s in _SPLITS}, generated=False)

    # Drop the old annotation files before touching any image: if we crash
    # half-way, no JSON can vouch for a mixture of old and new images.
    for split in _SPLITS:
        if existing[split] is not None:
            (ann_dir / f'instances_{split}.json').unlink(missing_ok=True)

    ann_dir.mkdir(parents=True, exist_ok=True)
    # Independent sub-streams: train and val differ, and each image depends
    # only on (seed, split, index), so image i is the same for any count.
    split_seqs = np.random.SeedSequence(int(seed)).spawn(len(_SPLITS))
    written: dict[str, dict[str, Any]] = {}
    for split, split_seq in zip(_SPLITS, split_seqs, strict=True):
        img_dir = root_path / split
        img_dir.mkdir(parents=True, exist_ok=True)
        coco = _generate_split(split, counts[split], (height, width), split_seq, img_dir, params)
        _remove_stale_images(img_dir, existing[split], coco)
        _atomic_write(ann_dir / f'instances_{split}.json', _dump_json(coco))
        written[split] = coco
    return _summary(root_path, written, generated=True)


def _check_args(seed: Any, num_train: Any, num_val: Any, image_size: Any) -> tuple[int, int]:
    """Validate the public arguments and return ``(height, width)``.

    Raises:
        ValueError: Naming the argument, its value and the accepted range.
    """
    # bool is an int subclass; True as a count is almost certainly a mistake.
    def is_int(value: Any) -> bool:
        return isinstance(value, int | np.integer) and not isinstance(value, bool)

    if not is_int(seed) or seed < 0:
        raise ValueError(f'seed must be a non-negative int, got {seed!r}')
    for name, value in (('num_train', num_train), ('num_val', num_val)):
        if not is_int(value) or value < 1:
            raise ValueError(f'{name} must be an int >= 1, got {value!r}')
    if (
        not isinstance(image_size, tuple | list)
        or len(image_size) != 2
        or not all(is_int(side) for side in image_size)
    ):
        raise ValueError(f'image_size must be a (height, width) pair of ints, got {image_size!r}')
    height, width = int(image_size[0]), int(image_size[1])
    if min(height, width) < _MIN_IMAGE_SIDE or max(height, width) > _MAX_IMAGE_SIDE:
        raise ValueError(
            f'image_size must have both sides in [{_MIN_IMAGE_SIDE}, {_MAX_IMAGE_SIDE}] '
            f'(a large object, area >= 96**2, has to fit), got {image_size!r}'
        )
    return height, width


# --------------------------------------------------------------------------- files


def _read_own_json(path: Path) -> dict[str, Any] | None:
    """Load ``path`` if it is a COCO file written by this generator, else None."""
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None
    info = data.get('info') if isinstance(data, dict) else None
    if not isinstance(info, dict) or info.get('generator') != _GENERATOR_NAME:
        return None
    return data


def _is_current(
    coco: dict[str, Any] | None, params: dict[str, Any], split: str, img_dir: Path
) -> bool:
    """Whether ``coco`` was made with ``params`` and all its images are present."""
    if coco is None:
        return False
    info = coco['info']
    expected = {'version': GENERATOR_VERSION, 'split': split, 'params': params}
    if any(info.get(key) != value for key, value in expected.items()):
        return False
    return all((img_dir / img['file_name']).is_file() for img in coco.get('images', []))


def _remove_stale_images(img_dir: Path, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
    """Delete images listed by our previous JSON that the new dataset lacks.

    Only names our own old annotation file vouches for are touched, so files a
    user put next to the dataset survive a regeneration.
    """
    if old is None:
        return
    keep = {img['file_name'] for img in new['images']}
    for img in old.get('images', []):
        name = img.get('file_name', '')
        if isinstance(name, str) and _FILE_RE.match(name) and name not in keep:
            (img_dir / name).unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so readers never observe a partial file.

    Args:
        path: Destination; the temporary file lives in the same directory so
            that ``os.replace`` is an atomic rename.
        data: File content.
        durable: fsync before the rename. Images skip it (it dominated the run
            time); the annotation files, written last, keep it.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dump_json(coco: dict[str, Any]) -> bytes:
    """Serialise deterministically (fixed key order, no timestamps)."""
    return (json.dumps(coco, separators=(',', ':'), ensure_ascii=True) + '\n').encode('utf-8')


def _encode_png(rgb: np.ndarray) -> bytes:
    """Encode an RGB uint8 image as PNG bytes (OpenCV if present, else Pillow)."""
    try:
        import cv2  # optional backend, imported lazily to keep this module light
    except ImportError:
        cv2 = None
    if cv2 is not None:
        # Noisy images barely compress; a low level saves most of the time.
        params = [cv2.IMWRITE_PNG_COMPRESSION, _PNG_COMPRESSION]
        ok, buf = cv2.imencode('.png', np.ascontiguousarray(rgb[:, :, ::-1]), params)
        if not ok:
            raise OSError('cv2.imencode failed to encode a PNG')
        return buf.tobytes()
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(
            'make_synthetic_coco needs opencv-python (cv2) or Pillow to write PNGs'
        ) from err
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format='PNG', compress_level=_PNG_COMPRESSION)
    return out.getvalue()


def _summary(root: Path, cocos: dict[str, dict[str, Any]], *, generated: bool) -> dict[str, Any]:
    """Build the summary returned by :func:`make_synthetic_coco`."""
    summary: dict[str, Any] = {'root': str(root), 'classes': CLASSES, 'generated': generated}
    for split in _SPLITS:
        coco = cocos[split]
        buckets = dict.fromkeys(_BUCKETS, 0)
        for ann in coco['annotations']:
            buckets[_bucket_of(ann['area'])] += 1
        summary[split] = {
            'img_dir': str(root / split),
            'ann_file': str(root / 'annotations' / f'instances_{split}.json'),
            'num_images': len(coco['images']),
            'num_objects': len(coco['annotations']),
            'size_buckets': buckets,
        }
    return summary


# --------------------------------------------------------------------------- content


def _bucket_of(area: float) -> str:
    """COCO size bucket of a box area."""
    if area < _SMALL_MAX:
        return 'small'
    if area < _MEDIUM_MAX:
        return 'medium'
    return 'large'


def _near_threshold(area: float) -> bool:
    """Whether ``area`` lies within the safety margin of a COCO bucket threshold."""
    return any(abs(area - t) <= _BUCKET_MARGIN * t for t in (_SMALL_MAX, _MEDIUM_MAX))


def _generate_split(
    split: str,
    num_images: int,
    size: tuple[int, int],
    seq: np.random.SeedSequence,
    img_dir: Path,
    params: dict[str, Any],
) -> dict[str, Any]:
    """Render and save one split's images; return its COCO dict."""
    height, width = size
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index, img_seq in enumerate(seq.spawn(num_images)):
        rng = np.random.default_rng(img_seq)
        rgb, objects = _render_image(rng, height, width)
        file_name = f'{index:06d}.png'
        _atomic_write(img_dir / file_name, _encode_png(rgb), durable=False)
        image_id = index + 1
        images.append({'id': image_id, 'file_name': file_name, 'height': height, 'width': width})
        for label, (x, y, w, h) in objects:
            annotations.append({
                'id': len(annotations) + 1,
                'image_id': image_id,
                'category_id': label + 1,
                'bbox': [float(x), float(y), float(w), float(h)],
                'area': float(w * h),
                'iscrowd': 0,
            })
    return {
        'info': {
            'description': 'mmattn synthetic shapes detection dataset',
            'generator': _GENERATOR_NAME,
            'version': GENERATOR_VERSION,
            'split': split,
            'params': params,
        },
        'licenses': [],
        'images': images,
        'annotations': annotations,
        'categories': [
            {'id': i + 1, 'name': name, 'supercategory': 'shape'} for i, name in enumerate(CLASSES)
        ],
    }


def _render_image(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, list[tuple[int, tuple[int, int, int, int]]]]:
    """Draw one image.

    Returns:
        The RGB uint8 image and a list of ``(label, (x, y, w, h))`` objects whose
        boxes tightly enclose their drawn pixels.
    """
    img = _background(rng, height, width)
    # Clutter goes under the objects so every annotated object stays fully
    # visible and its box stays tight around its own pixels.
    _draw_blobs(rng, img)
    _draw_lines(rng, img)

    n_objects = int(rng.integers(_OBJECTS_PER_IMAGE[0], _OBJECTS_PER_IMAGE[1] + 1))
    specs = [_sample_object(rng, height, width) for _ in range(n_objects)]
    # Placing the largest first keeps big objects from being crowded out, which
    # would otherwise skew the size distribution towards small.
    specs.sort(key=lambda s: s[1].size, reverse=True)

    occupied = np.zeros((height, width), dtype=bool)
    boxes: list[tuple[int, int, int, int]] = []
    objects: list[tuple[int, tuple[int, int, int, int]]] = []
    for label, mask in specs:
        h, w = mask.shape
        for _ in range(_PLACEMENT_TRIES):
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            box = (x, y, w, h)
            # Boxes may overlap a little, but pixels never do: an occluded edge
            # would make the box larger than the visible object.
            if any(_iou(box, other) > _MAX_IOU for other in boxes):
                continue
            if np.any(occupied[y : y + h, x : x + w] & mask):
                continue
            occupied[y : y + h, x : x + w] |= mask
            region = img[y : y + h, x : x + w]
            region[mask] = _object_colour(rng, label)
            boxes.append(box)
            objects.append((label, box))
            break

    _add_noise(rng, img, luminance_std=5.0, chroma_std=1.5)
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _sample_object(rng: np.random.Generator, height: int, width: int) -> tuple[int, np.ndarray]:
    """Pick a class and a size bucket, then a tight mask of that bucket.

    Returns:
        ``(label, mask)`` where ``mask`` is a boolean array touching all four
        of its edges, so its shape is exactly the object's box.
    """
    label = int(rng.integers(len(CLASSES)))
    bucket = _BUCKETS[int(rng.choice(len(_BUCKETS), p=_BUCKET_PROBS))]
    min_side = min(height, width)
    # Side ranges (sqrt of box area) well inside each bucket; the margin check
    # below still catches aspect-ratio and trimming effects.
    side_range = {
        'small': (10.0, 31.0),
        'medium': (33.0, 94.0),
        'large': (98.0, max(100.0, min(160.0, 0.8 * min_side))),
    }[bucket]
    for _ in range(_SIZE_TRIES):
        side = rng.uniform(*side_range)
        # Squares, disks and crosses are symmetric; only triangles get an aspect.
        aspect = rng.uniform(0.8, 1.25) if CLASSES[label] == 'triangle' else 1.0
        w = min(width, max(4, round(side * np.sqrt(aspect))))
        h = min(height, max(4, round(side / np.sqrt(aspect))))
        mask = _shape_mask(rng, label, h, w)
        area = float(mask.shape[0] * mask.shape[1])
        if _bucket_of(area) == bucket and not _near_threshold(area):
            return label, mask
    # Unreachable in practice with the ranges above; fall back to a safe small
    # object so a pathological draw cannot produce an ambiguous bucket.
    return label, _shape_mask(rng, label, 20, 20)


def _shape_mask(rng: np.random.Generator, label: int, h: int, w: int) -> np.ndarray:
    """Filled mask of class ``label`` in an ``h x w`` box, trimmed to its pixels."""
    name = CLASSES[label]
    if name == 'square':
        side = min(h, w)
        mask = np.ones((side, side), dtype=bool)
    elif name == 'disk':
        d = min(h, w)
        yy, xx = _pixel_centres(d, d)
        r = d / 2.0
        mask = (xx - r) ** 2 + (yy - r) ** 2 <= r * r
    elif name == 'triangle':
        k = int(rng.integers(4))  # apex up/left/down/right
        th, tw = (w, h) if k % 2 else (h, w)
        yy, xx = _pixel_centres(th, tw)
        # Apex at top centre, base along the bottom edge: inside = on the inner
        # side of both slanted edges (the base edge is the box bottom itself).
        left = (xx - tw / 2.0) * th + (tw / 2.0) * yy >= 0  # right of apex->bottom-left edge
        right = (tw / 2.0 - xx) * th + (tw / 2.0) * yy >= 0  # left of apex->bottom-right edge
        mask = np.rot90(left & right, k)
    elif name == 'cross':
        side = min(h, w)
        t = max(2, round(side * rng.uniform(0.28, 0.4)))
        start = (side - t) // 2
        mask = np.zeros((side, side), dtype=bool)
        mask[start : start + t, :] = True
        mask[:, start : start + t] = True
    else:  # pragma: no cover - CLASSES and this switch are edited together
        raise AssertionError(name)
    return _trim(mask)


def _pixel_centres(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of pixel centres (broadcastable grids)."""
    yy = np.arange(h, dtype=np.float64)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float64)[None, :] + 0.5
    return yy, xx


def _trim(mask: np.ndarray) -> np.ndarray:
    """Crop a mask to the bounding box of its True pixels."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.ascontiguousarray(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two ``(x, y, w, h)`` boxes."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _object_colour(rng: np.random.Generator, label: int) -> np.ndarray:
    """Class base colour with per-object brightness and channel jitter.

    The jitter is bounded so every object stays far more saturated than the
    grey background and clutter (the tests rely on that margin).
    """
    base = np.asarray(_CLASS_RGB[label], dtype=np.float32)
    return base * rng.uniform(0.8, 1.1) + rng.uniform(-12.0, 12.0, size=3).astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-saturation linear gradient in a random direction (float32 RGB)."""
    yy, xx = _pixel_centres(height, width)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    proj = (np.cos(angle) * xx / width + np.sin(angle) * yy / height).astype(np.float32)
    proj = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    c0 = _grey(rng, 60.0, 190.0, tint=6.0).astype(np.float32)
    c1 = _grey(rng, 60.0, 190.0, tint=6.0).astype(np.float32)
    return c0 + (c1 - c0) * proj[:, :, None]


def _grey(rng: np.random.Generator, low: float, high: float, *, tint: float) -> np.ndarray:
    """A grey level in ``[low, high]`` with a small per-channel tint."""
    return rng.uniform(low, high) + rng.uniform(-tint, tint, size=3)


def _draw_blobs(rng: np.random.Generator, img: np.ndarray) -> None:
    """Unannotated grey blobs (ellipses, rectangles, triangles) of random size."""
    height, width = img.shape[:2]
    for _ in range(int(rng.integers(3, 9))):
        bw, bh = (int(v) for v in rng.integers(6, 71, size=2))
        bw, bh = min(bw, width), min(bh, height)
        x0 = int(rng.integers(0, width - bw + 1))
        y0 = int(rng.integers(0, height - bh + 1))
        yy, xx = _pixel_centres(bh, bw)
        kind = int(rng.integers(3))
        if kind == 0:  # axis-aligned ellipse
            mask = ((xx - bw / 2) / (bw / 2)) ** 2 + ((yy - bh / 2) / (bh / 2)) ** 2 <= 1.0
        elif kind == 1:  # rectangle
            mask = np.ones((bh, bw), dtype=bool)
        else:  # random triangle from three points in the box
            pts = rng.uniform(0, 1, size=(3, 2)) * (bw, bh)
            mask = _triangle_mask(xx, yy, pts)
        img[y0 : y0 + bh, x0 : x0 + bw][mask] = _grey(rng, 30.0, 230.0, tint=8.0)


def _triangle_mask(xx: np.ndarray, yy: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Points inside the triangle ``pts`` (3x2, x/y), by three half-plane tests."""
    signs = []
    for i in range(3):
        (ax, ay), (bx, by) = pts[i], pts[(i + 1) % 3]
        signs.append((bx - ax) * (yy - ay) - (by - ay) * (xx - ax))
    s0, s1, s2 = signs
    # Inside iff on the same side of all three edges, whatever the winding.
    return ((s0 >= 0) & (s1 >= 0) & (s2 >= 0)) | ((s0 <= 0) & (s1 <= 0) & (s2 <= 0))


def _draw_lines(rng: np.random.Generator, img: np.ndarray) -> None:
    """Unannotated thin grey line segments (distance-to-segment test)."""
    height, width = img.shape[:2]
    for _ in range(int(rng.integers(4, 13))):
        p = rng.uniform(0, 1, size=2) * (width, height)
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(20, 150)
        q = p + length * np.array([np.cos(angle), np.sin(angle)])
        half = rng.uniform(0.5, 1.2)  # half thickness: 1-2 px lines
        x0 = max(0, int(np.floor(min(p[0], q[0]) - half)))
        x1 = min(width, int(np.ceil(max(p[0], q[0]) + half)) + 1)
        y0 = max(0, int(np.floor(min(p[1], q[1]) - half)))
        y1 = min(height, int(np.ceil(max(p[1], q[1]) + half)) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        yy, xx = _pixel_centres(y1 - y0, x1 - x0)
        px, py = xx + x0 - p[0], yy + y0 - p[1]
        d = q - p
        t = np.clip((px * d[0] + py * d[1]) / float(d @ d), 0.0, 1.0)
        mask = (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 <= half * half
        img[y0:y1, x0:x1][mask] = _grey(rng, 20.0, 235.0, tint=6.0)


def _add_noise(
    rng: np.random.Generator, img: np.ndarray, *, luminance_std: float, chroma_std: float
) -> None:
    """Sensor-like noise: mostly shared across channels so saturation stays put."""
    height, width = img.shape[:2]
    # float32 draws: half the cost of float64 and precision is irrelevant here.
    img += np.float32(luminance_std) * rng.standard_normal((height, width, 1), dtype=np.float32)
    img += np.float32(chroma_std) * rng.standard_normal((height, width, 3), dtype=np.float32)
