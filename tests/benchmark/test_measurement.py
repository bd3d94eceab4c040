"""Timing statistics and the memory meters of the benchmark."""
import os
import sys

import pytest
import torch

from mmattn.backbones import AttnResNet
from mmattn.benchmark.memory import peak_bytes, saved_bytes
from mmattn.benchmark.timing import Ratio, interleaved, pair_ratios


def test_interleaved_puts_every_run_between_two_baseline_calls():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ('base', 'a', 'b')}
    times = interleaved(runs, 'base', rounds=2, warmup=0)
    assert calls == ['base', 'a', 'base', 'b', 'base', 'base', 'b', 'base', 'a', 'base']
    assert len(times['a']) == len(times['b']) == 2
    assert len(times['base@a']) == 2


def test_pair_ratios_divide_by_the_neighbouring_baseline():
    times = {'base': [1.0] * 4, 'a': [2.0, 3.0], 'base@a': [1.0, 2.0]}
    ratio = pair_ratios(times, 'base')['a']
    assert (ratio.median, ratio.low, ratio.high, ratio.rounds) == (1.75, 1.5, 2.0, 2)


def test_ratio_summary_reports_median_and_quartiles():
    ratio = Ratio.of([1.0, 1.1, 1.2, 1.3, 5.0])
    assert ratio.median == 1.2 and ratio.q1 == 1.1 and ratio.q3 == 1.3
    assert str(ratio) == '1.200 [1.100-1.300]'


def test_saved_bytes_counts_each_storage_once_and_skips_excluded():
    w = torch.randn(1000, requires_grad=True)

    def step():
        y = w * 2          # mul by a scalar keeps nothing large
        return (y * y).sum() + (y * w).sum()   # y kept once (4000 B), w excluded
    assert saved_bytes(step, exclude=[w]) == 4000


def test_peak_bytes_sees_the_largest_live_set():
    w = torch.randn(1000, requires_grad=True)

    def step():
        a = w * 2
        b = a * 3
        return (a * b).sum()
    # a, b (kept for backward) and a * b live at once: 3 x 4000 bytes at least.
    assert peak_bytes(step, torch.device('cpu')) >= 12000


def test_peak_bytes_drops_the_profilers_chatter_and_passes_on_other_stderr(capfd):
    before = torch.randn(1000)

    def step():
        nonlocal before
        del before   # freed inside the session: c10 warns of a block it did not see allocated
        os.write(2, b'[W] CPUAllocator.cpp: allocated before the profiling started\n')
        os.write(2, b'a message of the step\n')
        return (torch.randn(10, requires_grad=True) * 2).sum()
    print('before the step', file=sys.stderr)
    peak_bytes(step, torch.device('cpu'))
    err = capfd.readouterr().err
    assert err.splitlines() == ['before the step', 'a message of the step']


def _kept(plugins, x, fused=True):
    model = AttnResNet(50, base_channels=16, plugins=plugins).train()
    if not fused:  # a hooked plugin is called as a module: out = plugin(out); out += identity
        for name, module in model.named_modules():
            if name.endswith(('.se', '.sge', '.cbam')):
                module.register_forward_pre_hook(lambda mod, args: None)

    def step():
        return sum(out.mean() for out in model(x))
    return saved_bytes(step, exclude=[*model.parameters(), *model.buffers(), x])


@pytest.mark.parametrize('block', ['SqueezeExcitation', 'SpatialGroupEnhance',
                                   'ConvolutionalBlockAttention'])
def test_fused_blocks_keep_no_feature_map_for_backward(block):
    # The block's input is recomputed from bn3's input (or, with the frozen bn3 folded in, is
    # bn3's input); only gates, indices and per-channel values stay. 96 x 96 images: maps large
    # enough that per-channel tensors are small beside one feature map per block.
    x = torch.randn(2, 3, 96, 96)
    cfg = dict(type=block, **({'groups': 8} if block == 'SpatialGroupEnhance' else {}))
    plugins = [dict(cfg=cfg, position='after_conv3')]
    plain = _kept(None, x)
    fused = _kept(plugins, x)
    unfused = _kept(plugins, x, fused=False)
    assert fused - plain < (unfused - plain) / 5
