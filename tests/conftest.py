import pathlib

import pytest
import torch

import mmattn  # noqa: F401  (registers the blocks for every test)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'


@pytest.fixture
def configs() -> pathlib.Path:
    """The repository's configs folder, wherever the test runs from."""
    return CONFIGS
