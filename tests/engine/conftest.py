import pathlib

import pytest

from mmattn.datasets import make_synthetic_coco

TINY_CONFIG = 'tests/engine/configs/tiny_retinanet.py'


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> pathlib.Path:
    """Six training and two validation images of 128x128 (three batches of two per epoch)."""
    root = tmp_path_factory.mktemp('tiny_data')
    make_synthetic_coco(root, seed=1, num_train=6, num_val=2, image_size=(128, 128))
    return root
