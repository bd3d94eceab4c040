"""Reference blocks for the benchmark: the authors' op sequences, independent of mmattn.blocks.

Each module re-implements, step by step, the way the published code computes a block (papers.md
§3, the SGE paper's PytorchInsight modules, the CGD authors' cascaded module, the GSoP and ECA
authors' modules). They are written from that math, not copied, and share nothing with
:mod:`mmattn.blocks`, so the benchmark compares mmattn against code shaped like what a user would
otherwise run. They are not registered (nothing in a config should build them); the benchmark
passes the classes to :class:`~mmattn.backbones.AttnResNet` directly. GC is mmcv's own
``ContextBlock``, used as it is.

The constructors take ``in_channels`` (what :class:`~mmattn.backbones.AttnResNet` passes) and
the parameters have the same shapes as the mmattn blocks', so both sides do the same arithmetic.
"""
import torch
import torch.nn as nn


class ReferenceSE(nn.Module):
    """PytorchInsight's SE layer: avgpool, Linear C -> C/16, ReLU, Linear, sigmoid, x * y."""

    _abbr_ = 'se'

    def __init__(self, in_channels: int, rd_ratio: float = 1 / 16) -> None:
        super().__init__()
        hidden = max(1, int(in_channels * rd_ratio))
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(in_channels, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, in_channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)


class ReferenceSGE(nn.Module):
    """PytorchInsight's SpatialGroupEnhance, op by op (papers.md §3.1).

    ``reshape`` where the authors write ``view``: the same for contiguous tensors, while their
    ``view`` raises on a channels_last input, which ``reshape`` copies.
    """

    _abbr_ = 'sge'

    def __init__(self, in_channels: int, groups: int = 64) -> None:
        super().__init__()
        self.groups = groups
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))
        self.sig = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.size()
        x = x.reshape(b * self.groups, -1, h, w)
        xn = x * self.avg_pool(x)
        xn = xn.sum(dim=1, keepdim=True)
        t = xn.reshape(b * self.groups, -1)
        t = t - t.mean(dim=1, keepdim=True)
        std = t.std(dim=1, keepdim=True) + 1e-5
        t = t / std
        t = t.reshape(b, self.groups, h, w)
        t = t * self.weight + self.bias
        t = t.reshape(b * self.groups, 1, h, w)
        x = x * self.sig(t)
        return x.reshape(b, c, h, w)


class ReferenceCGD(nn.Module):
    """The CGD authors' cascaded module as their detection copy runs it: explicit C x C matrices.

    psi = tanh(softmax(avg) avg^T w0 + b0), phi = tanh(softmax(avg) max^T w1 + b1),
    out = x * (1 + tanh(psi phi^T w2 + b2)) (papers.md §3.3).
    """

    _abbr_ = 'cgd'

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        c = in_channels
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.softmax = nn.Softmax(dim=1)
        self.w0, self.w1, self.w2 = (nn.Parameter(torch.empty(c, 1)) for _ in range(3))
        self.bias0, self.bias1, self.bias2 = (
            nn.Parameter(torch.zeros(1, c, 1, 1)) for _ in range(3))
        for w in (self.w0, self.w1, self.w2):
            nn.init.xavier_uniform_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        avg = self.avg_pool(x).view(b, c, 1)
        peak = self.max_pool(x).view(b, c, 1)
        soft = self.softmax(avg)
        psi = torch.bmm(soft, avg.transpose(1, 2))  # (B, C, C)
        psi = torch.tanh(torch.matmul(psi, self.w0).view(b, c, 1, 1) + self.bias0)
        phi = torch.bmm(soft, peak.transpose(1, 2))
        phi = torch.tanh(torch.matmul(phi, self.w1).view(b, c, 1, 1) + self.bias1)
        gate = torch.bmm(psi.view(b, c, 1), phi.view(b, 1, c))
        gate = torch.tanh(torch.matmul(gate, self.w2).view(b, c, 1, 1) + self.bias2)
        return x * (1 + gate)


class ReferenceECA(nn.Module):
    """The ECA authors' eca_layer: avgpool, Conv1d over the channel axis, sigmoid, x * y."""

    _abbr_ = 'eca'

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        t = int(abs((torch.tensor(float(in_channels)).log2().item() + 1) / 2))
        k = t if t % 2 else t + 1
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.avg_pool(x)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * self.sigmoid(y).expand_as(x)


class _ChannelGate(nn.Module):

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(),
                                 nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = (x.size(2), x.size(3))
        att = self.mlp(nn.functional.avg_pool2d(x, window, stride=window))
        att = att + self.mlp(nn.functional.max_pool2d(x, window, stride=window))
        return x * torch.sigmoid(att).unsqueeze(2).unsqueeze(3).expand_as(x)


class _SpatialGate(nn.Module):

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)], 1)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))


class ReferenceCBAM(nn.Module):
    """PytorchInsight's CBAM: channel gate (avg and max pools, shared MLP), then spatial gate."""

    _abbr_ = 'cbam'

    def __init__(self, in_channels: int, rd_ratio: float = 1 / 16) -> None:
        super().__init__()
        self.ChannelGate = _ChannelGate(in_channels, max(1, int(in_channels * rd_ratio)))
        self.SpatialGate = _SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SpatialGate(self.ChannelGate(x))


class ReferenceGSoP(nn.Module):
    """The GSoP authors' channel attention (GSoP-Net1), with the covariance as X Ibar X^T.

    ReLU, 1x1 conv C -> 128 (stride 2 in stage 1), BN, ReLU, covariance with the explicit
    centring matrix Ibar, row BN, row-wise grouped conv, 1x1 conv to C, sigmoid, x * att.
    """

    _abbr_ = 'gsop'

    def __init__(self, in_channels: int, att_dim: int = 128) -> None:
        super().__init__()
        stride = 2 if in_channels <= 256 else 1
        self.relu = nn.ReLU(inplace=False)
        self.conv_for_DR = nn.Conv2d(in_channels, att_dim, 1, stride=stride)
        self.bn_for_DR = nn.BatchNorm2d(att_dim)
        self.row_bn = nn.BatchNorm2d(att_dim)
        self.row_conv_group = nn.Conv2d(att_dim, 4 * att_dim, (att_dim, 1), groups=att_dim)
        self.fc_adapt_channels = nn.Conv2d(4 * att_dim, in_channels, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(x)
        out = self.relu(self.bn_for_DR(self.conv_for_DR(out)))
        b, d, h, w = out.size()
        m = h * w
        flat = out.reshape(b, d, m)
        i_hat = (-1. / m / m) * torch.ones(m, m, device=x.device) + (1. / m) * torch.eye(
            m, m, device=x.device)
        i_hat = i_hat.view(1, m, m).repeat(b, 1, 1).type(flat.dtype)
        cov = flat.bmm(i_hat).bmm(flat.transpose(1, 2))
        out = self.row_bn(cov.view(b, d, d, 1))
        out = self.row_conv_group(out)
        out = self.sigmoid(self.fc_adapt_channels(out))
        return x * out


class ReferenceBAM(nn.Module):
    """PytorchInsight's BAM: x * (1 + sigmoid(channel_att(x) * spatial_att(x)))."""

    _abbr_ = 'bam'

    def __init__(self, in_channels: int, rd_ratio: float = 1 / 16, dilation: int = 4) -> None:
        super().__init__()
        hidden = max(1, int(in_channels * rd_ratio))
        self.channel = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, in_channels))
        layers = [nn.Conv2d(in_channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU()]
        for _ in range(2):
            layers += [nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation),
                       nn.BatchNorm2d(hidden), nn.ReLU()]
        layers.append(nn.Conv2d(hidden, 1, 1))
        self.spatial = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = self.channel(nn.functional.adaptive_avg_pool2d(x, 1))
        channel = channel.unsqueeze(2).unsqueeze(3).expand_as(x)
        att = 1 + torch.sigmoid(channel * self.spatial(x).expand_as(x))
        return att * x
