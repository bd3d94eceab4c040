"""Reference ImageNet ResNets under the authors' module names, for the conversion tests.

torchvision-style ResNets (conv1, bn1, layerN.i.conv1..3 / bn1..3 / downsample.0/1, fc) at a
chosen width, with each paper's attention written anew from the math in papers.md section 3 and
named as its authors' code names it (PytorchInsight ``se.fc``, ``sge``, ``cbam.ChannelGate``,
``bam1``; CGD ``attention``; GSoP layers on the block itself; ECA ``eca.conv``). Nothing is
imported from mmattn, so a wrong key mapping in the converter shows up as different outputs.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

# The blocks per stage of ResNet-50.
RESNET50 = (3, 4, 6, 3)
# Attention kinds and where they run in a Bottleneck.
PRE_NORM = ('cgd', )                       # conv1 -> [A] -> bn1
POST_NORM = ('se', 'sge', 'cbam', 'eca')   # bn3 -> [A] -> + identity


class SE(nn.Module):
    """PytorchInsight's SELayer names: fc = Linear, ReLU, Linear, Sigmoid."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = channels // reduction
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(),
                                nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


class SGE(nn.Module):
    """Spatial group-wise enhance (papers.md 3.1), with ``weight`` and ``bias`` (1, G, 1, 1)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        grouped = x.view(n, self.groups, c // self.groups, h, w)
        centre = grouped.mean(dim=(3, 4), keepdim=True)
        score = (grouped * centre).sum(dim=2).flatten(2)           # (n, G, h*w)
        score = score - score.mean(dim=2, keepdim=True)
        score = score / (score.std(dim=2, keepdim=True) + 1e-5)
        score = score.view(n, self.groups, h, w) * self.weight + self.bias
        return (grouped * torch.sigmoid(score).unsqueeze(2)).view(n, c, h, w)


class _ChannelGate(nn.Module):
    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = channels // reduction
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(),
                                 nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(logits)[:, :, None, None]


class _SpatialGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.spatial = nn.Module()
        self.spatial.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.spatial.bn = nn.BatchNorm2d(1, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.cat([x.max(dim=1, keepdim=True).values, x.mean(dim=1, keepdim=True)], 1)
        return x * torch.sigmoid(self.spatial.bn(self.spatial.conv(maps)))


class CBAM(nn.Module):
    """Channel gate then spatial gate (papers.md 3.5), PytorchInsight's names."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.ChannelGate = _ChannelGate(channels, reduction)
        self.SpatialGate = _SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SpatialGate(self.ChannelGate(x))


class BAM(nn.Module):
    """x * (1 + sigmoid(channel * spatial)) (papers.md 3.5), PytorchInsight's names."""

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4) -> None:
        super().__init__()
        hidden = channels // reduction
        self.channel_att = nn.Module()
        self.channel_att.gate_c = nn.Sequential(OrderedDict(
            gate_c_fc_0=nn.Linear(channels, hidden), gate_c_bn_1=nn.BatchNorm1d(hidden),
            gate_c_relu_1=nn.ReLU(), gate_c_fc_final=nn.Linear(hidden, channels)))
        layers = OrderedDict(gate_s_conv_reduce0=nn.Conv2d(channels, hidden, 1),
                             gate_s_bn_reduce0=nn.BatchNorm2d(hidden),
                             gate_s_relu_reduce0=nn.ReLU())
        for i in range(2):
            layers[f'gate_s_conv_di_{i}'] = nn.Conv2d(hidden, hidden, 3, padding=dilation,
                                                      dilation=dilation)
            layers[f'gate_s_bn_di_{i}'] = nn.BatchNorm2d(hidden)
            layers[f'gate_s_relu_di_{i}'] = nn.ReLU()
        layers['gate_s_conv_final'] = nn.Conv2d(hidden, 1, 1)
        self.spatial_att = nn.Module()
        self.spatial_att.gate_s = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = self.channel_att.gate_c(x.mean(dim=(2, 3)))[:, :, None, None]
        return x * (1 + torch.sigmoid(channel * self.spatial_att.gate_s(x)))


class ECA(nn.Module):
    """sigmoid(conv1d_k(avgpool(x))) gate, the ECANet name ``conv``."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.conv(x.mean(dim=(2, 3)).unsqueeze(1))).squeeze(1)
        return x * gate[:, :, None, None]


class CGD(nn.Module):
    """The cascaded descriptor in the paper's C x C matrix form (papers.md 3.3)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        for i in range(3):
            setattr(self, f'w{i}', nn.Parameter(torch.randn(channels, 1) / channels**0.5))
            setattr(self, f'bias{i}', nn.Parameter(torch.zeros(1, channels, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        avg, peak = x.mean(dim=(2, 3)), x.amax(dim=(2, 3))
        soft = torch.softmax(avg, dim=1)

        def squeeze(matrix: torch.Tensor, i: int) -> torch.Tensor:
            bias = getattr(self, f'bias{i}').view(1, c)
            return torch.tanh((matrix @ getattr(self, f'w{i}')).view(n, c) + bias)

        psi = squeeze(torch.bmm(soft.unsqueeze(2), avg.unsqueeze(1)), 0)
        phi = squeeze(torch.bmm(soft.unsqueeze(2), peak.unsqueeze(1)), 1)
        gate = squeeze(torch.bmm(psi.unsqueeze(2), phi.unsqueeze(1)), 2)
        return x * (1 + gate[:, :, None, None])


class Bottleneck(nn.Module):
    """A torchvision Bottleneck (stride on the 3x3 conv) with one optional attention.

    ``kind`` 'gsop' puts the GSoP-Net1 channel attention's layers on the block itself, as the
    GSoP authors do (conv_for_DR, bn_for_DR, row_bn, row_conv_group, fc_adapt_channels).
    """

    def __init__(self, inplanes: int, planes: int, stride: int, kind: str | None,
                 options: dict) -> None:
        super().__init__()
        out = planes * 4
        self.kind = kind
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride,
                                                      bias=False), nn.BatchNorm2d(out))
        if kind == 'cgd':
            self.attention = CGD(planes)
        elif kind == 'se':
            self.se = SE(out)
        elif kind == 'sge':
            self.sge = SGE(options['groups'])
        elif kind == 'cbam':
            self.cbam = CBAM(out)
        elif kind == 'eca':
            self.eca = ECA(options['kernel_sizes'][options['stage']])
        elif kind == 'gsop':
            dim = options['att_dim']
            # The authors' rule: the reduction conv strides 2 while planes <= 64.
            self.conv_for_DR = nn.Conv2d(out, dim, 1, stride=2 if planes <= 64 else 1)
            self.bn_for_DR = nn.BatchNorm2d(dim)
            self.row_bn = nn.BatchNorm2d(dim)
            self.row_conv_group = nn.Conv2d(dim, 4 * dim, (dim, 1), groups=dim)
            self.fc_adapt_channels = nn.Conv2d(4 * dim, out, 1)

    def gsop_attention(self, x: torch.Tensor) -> torch.Tensor:
        """papers.md 3.4: covariance of the reduced features, row-wise conv, 1x1 conv, sigmoid."""
        reduced = F.relu(self.bn_for_DR(self.conv_for_DR(F.relu(x))))
        n, d, h, w = reduced.shape
        m = h * w
        flat = reduced.reshape(n, d, m)
        centring = torch.eye(m) / m - torch.ones(m, m) / m**2
        covariance = flat @ centring @ flat.transpose(1, 2)       # (n, d, d)
        rows = self.row_conv_group(self.row_bn(covariance.unsqueeze(3)))
        return torch.sigmoid(self.fc_adapt_channels(rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if self.kind == 'cgd':
            out = self.attention(out)
        out = F.relu(self.bn1(out))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.kind in POST_NORM:
            out = getattr(self, self.kind)(out)
        elif self.kind == 'gsop':
            out = out * self.gsop_attention(out)
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ReferenceResNet(nn.Module):
    """A torchvision-layout ResNet with ``kind`` attention, at stem and base width ``width``.

    Args:
        kind: None, 'se', 'sge', 'cbam', 'eca', 'cgd' (every block), 'gsop' (the last block of
            each stage) or 'bam' (``bam1``..``bam3`` after stages 1-3).
        width: Channels of the stem and of stage 1's planes (64 in the published nets).
        blocks: Blocks per stage.
        last_stride: Stride of stage 4 (1 in GSoP-Net1).
        options: groups (sge), kernel_sizes per stage (eca), att_dim (gsop).
    """

    def __init__(self, kind: str | None = None, width: int = 16,
                 blocks: tuple[int, ...] = RESNET50, num_classes: int = 1000,
                 last_stride: int = 2, **options) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        inplanes = width
        for stage, count in enumerate(blocks):
            planes = width * 2**stage
            stride = 1 if stage == 0 else last_stride if stage == 3 else 2
            layer = []
            for index in range(count):
                block_kind = kind if kind != 'gsop' or index == count - 1 else None
                block_kind = None if kind == 'bam' else block_kind
                layer.append(Bottleneck(inplanes, planes, stride if index == 0 else 1,
                                        block_kind, dict(options, stage=stage)))
                inplanes = planes * 4
            setattr(self, f'layer{stage + 1}', nn.Sequential(*layer))
            if kind == 'bam' and stage < 3:
                setattr(self, f'bam{stage + 1}', BAM(inplanes))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        for stage in range(1, 5):
            x = getattr(self, f'layer{stage}')(x)
            bam = getattr(self, f'bam{stage}', None)
            if bam is not None:
                x = bam(x)
        return self.fc(x.mean(dim=(2, 3)))


def randomise(model: nn.Module, batch: int = 2, size: int = 64) -> nn.Module:
    """Random affine, attention and BN parameters, and running statistics that fit them.

    Running statistics are the exact averages over a random batch (momentum None in train
    mode), so the eval-mode network keeps its activations at a sensible scale.
    """
    norms = (nn.BatchNorm1d, nn.BatchNorm2d)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, norms):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(std=0.2)
            elif not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                for param in module.parameters(recurse=False):  # SGE, CGD: their own params
                    param.normal_(mean=0.5, std=0.5)
        momentum = {}
        for module in model.modules():
            if isinstance(module, norms):
                module.reset_running_stats()
                momentum[module], module.momentum = module.momentum, None
        model.train()
        model(torch.randn(batch, 3, size, size))
        for module, value in momentum.items():
            module.momentum = value
    return model.eval()
