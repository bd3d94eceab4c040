"""pointwise_conv: a 1x1 convolution as a batched matrix product, and when it is not."""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import profile

from mmattn.blocks._common import PointwiseConvSequential, pointwise_conv


def ops_run(fn, *args) -> set[str]:
    with profile() as prof:
        fn(*args)
    return {event.name for event in prof.events()}


def conv_and_input(bias: bool, dtype: torch.dtype = torch.float64):
    conv = nn.Conv2d(6, 4, 1, bias=bias).to(dtype)
    return conv, torch.randn(3, 6, 9, 11, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize('bias', [True, False])
def test_matmul_equals_conv2d_forward_and_gradients(bias):
    conv, x = conv_and_input(bias)
    grad = torch.randn(3, 4, 9, 11, dtype=torch.float64)
    out = pointwise_conv(conv, x)
    mine = torch.autograd.grad(out, [x, *conv.parameters()], grad)
    expected_out = F.conv2d(x, conv.weight, conv.bias)
    expected = torch.autograd.grad(expected_out, [x, *conv.parameters()], grad)
    torch.testing.assert_close(out, expected_out)
    for got, want in zip(mine, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize('bias', [True, False])
def test_contiguous_cpu_input_takes_the_matrix_product(bias):
    conv, x = conv_and_input(bias, torch.float32)
    ran = ops_run(pointwise_conv, conv, x)
    assert 'aten::convolution' not in ran
    assert ('aten::baddbmm' if bias else 'aten::bmm') in ran


@pytest.mark.parametrize('case', ['kernel_3', 'stride_2', 'padding', 'groups', 'channels_last',
                                  'autocast', 'linear', 'hooked'])
def test_other_convs_and_inputs_call_the_module(case):
    x = torch.randn(2, 6, 9, 11)
    conv = {'kernel_3': nn.Conv2d(6, 4, 3), 'stride_2': nn.Conv2d(6, 4, 1, stride=2),
            'padding': nn.Conv2d(6, 4, 1, padding=1), 'groups': nn.Conv2d(6, 4, 1, groups=2),
            'linear': nn.Linear(11, 3)}.get(case, nn.Conv2d(6, 4, 1))
    if case == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    calls = []
    if case == 'hooked':
        conv.register_forward_hook(lambda *_: calls.append(case))
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=case == 'autocast'):
        expected = conv(x)
        ran = ops_run(pointwise_conv, conv, x)
        out = pointwise_conv(conv, x)
    assert 'aten::bmm' not in ran and 'aten::baddbmm' not in ran
    assert ('aten::linear' if case == 'linear' else 'aten::convolution') in ran
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert calls == ([case] * 3 if case == 'hooked' else [])


def test_sequential_keeps_its_modules_and_state_dict_keys():
    layers = dict(reduce=nn.Conv2d(6, 3, 1), norm=nn.BatchNorm2d(3), act=nn.ReLU(),
                  final=nn.Conv2d(3, 1, 1))
    plain = nn.Sequential(OrderedDict(layers)).double().eval()
    mine = PointwiseConvSequential(OrderedDict(layers)).double().eval()
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    assert list(mine.state_dict()) == list(plain.state_dict())
    torch.testing.assert_close(mine(x), plain(x))
    ran = ops_run(mine, x)
    assert 'aten::convolution' not in ran and 'aten::baddbmm' in ran
