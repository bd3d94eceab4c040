"""Helpers shared by the blocks: argument checks and the fp32 statistics region."""
import contextlib

import torch
import torch.nn as nn


def check_divisible(block: nn.Module, in_channels: int, **divisors: int) -> None:
    """Raise ValueError unless every named divisor divides ``in_channels``."""
    for name, value in divisors.items():
        if value < 1 or in_channels % value:
            raise ValueError(
                f'{type(block).__name__}: in_channels={in_channels} is not '
                f'divisible by {name}={value}; choose a {name} that divides '
                f'{in_channels} (e.g. {name}={_largest_divisor(in_channels, value)}).')


def reduced_channels(block: nn.Module, in_channels: int, rd_ratio: float) -> int:
    """Width of a reduction layer: ``in_channels * rd_ratio``, at least 1."""
    if not 0 < rd_ratio <= 1:
        raise ValueError(
            f'{type(block).__name__}: rd_ratio={rd_ratio} must be a fraction in '
            '(0, 1], e.g. rd_ratio=1 / 16 for a 16x reduction.')
    return max(1, int(in_channels * rd_ratio + 1e-9))


def fp32_region(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off for ``x``'s device, so statistics stay in fp32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)
