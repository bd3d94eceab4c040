"""Interleaved wall-clock timing and the statistics of per-pair ratios.

On a shared machine the speed of a run drifts with what else is running. Timing every candidate
once per round, each between two calls of the baseline, in a rotated order, and dividing each
candidate's time by the mean of its two neighbouring baseline times cancels most of that drift;
the median over rounds of those per-pair ratios is the figure, and its spread (the interquartile
range, and the lowest and highest ratio) says how far to trust it.
"""
import ctypes
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def interleaved(runs: Mapping[str, Callable[[], object]], baseline: str, rounds: int,
                warmup: int = 1, device: torch.device = torch.device('cpu'), repeat: int = 1,
                on_round: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each run, ``rounds`` times, interleaved with the baseline.

    Every run is called ``warmup`` times first (kernel selection, allocator growth). A round
    calls the baseline, then each other run followed by the baseline again, in an order rotated
    by the round number: ``B r1 B r2 B ... rk B``. So every run sits between two baseline calls
    made seconds apart, whatever else the machine does meanwhile. A call's time is the fastest
    of ``repeat`` back-to-back calls, which drops the moments another process took the CPU.
    The baseline's list holds, per round and run (in the order of ``runs``), the mean of its two
    neighbouring calls; every other list holds one time per round.
    """
    names = [name for name in runs if name != baseline]
    for _ in range(warmup):
        for name in [baseline, *names]:
            runs[name]()
    synchronize(device)

    def timed(name: str) -> float:
        best = float('inf')
        for _ in range(repeat):
            synchronize(device)
            start = time.perf_counter()
            runs[name]()
            synchronize(device)
            best = min(best, time.perf_counter() - start)
        return best

    times: dict[str, list[float]] = {name: [] for name in names}
    neighbours: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names) if names else 0
        before = timed(baseline)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(name))
            after = timed(baseline)
            neighbours[name].append((before + after) / 2)
            before = after
        if on_round is not None:
            on_round(r)
    times[baseline] = [t for r in range(rounds) for t in (neighbours[n][r] for n in names)]
    times.update({f'{baseline}@{name}': neighbours[name] for name in names})
    return times


@dataclass(frozen=True)
class Ratio:
    """Median of per-round ratios with its spread.

    Attributes:
        median (float): The median ratio.
        low (float): The lowest per-round ratio.
        high (float): The highest per-round ratio.
        q1 (float): The lower quartile.
        q3 (float): The upper quartile.
        rounds (int): How many ratios.
    """

    median: float
    low: float
    high: float
    q1: float
    q3: float
    rounds: int

    @classmethod
    def of(cls, values: list[float]) -> 'Ratio':
        ordered = sorted(values)
        if len(ordered) >= 2:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method='inclusive')
        else:
            q1 = q3 = ordered[0]
        return cls(statistics.median(ordered), ordered[0], ordered[-1], q1, q3, len(ordered))

    def __str__(self) -> str:
        return f'{self.median:.3f} [{self.q1:.3f}-{self.q3:.3f}]'


def pair_ratios(times: Mapping[str, list[float]], baseline: str) -> dict[str, Ratio]:
    """Each run's time over its neighbouring baseline calls' mean, per round, summarised."""
    return {name: Ratio.of([t / b for t, b in zip(values, times[f'{baseline}@{name}'],
                                                   strict=True)])
            for name, values in times.items()
            if name != baseline and not name.startswith(f'{baseline}@')}


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process instead of returning it to the OS.

    By default glibc serves large blocks (tens of MB here) with fresh ``mmap`` calls and gives
    freed memory back, so a network's feature maps are page-faulted in again on every pass:
    on the 2-core machine of the README about a fifth of a ResNet-50 forward pass, by an amount
    that depends on the exact sequence of allocations (a model that allocates one more small
    tensor can fault much more or much less). Raising the trim and mmap thresholds removes those
    faults for every model alike, so the ratios measure the models, not the allocator's luck;
    it is what tuned allocators (jemalloc, tcmalloc) do. Returns whether it applied (glibc
    only); it lasts for the rest of the process.
    """
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    limit = 1 << 30
    return bool(libc.mallopt(m_trim_threshold, limit)) and bool(
        libc.mallopt(m_mmap_threshold, limit))
