import pytest
import torch

import mmattn  # noqa: F401  (registers the blocks for every test)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
