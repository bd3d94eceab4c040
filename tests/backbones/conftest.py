import pytest


@pytest.fixture(autouse=True)
def _native_convolutions(native_convolutions):
    """Every test here builds whole backbones: see ``native_convolutions`` in tests/conftest.py."""
