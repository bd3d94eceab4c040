"""What an attention block does to an image's features: the saliency figures of the SGE and
CGD papers, captured with forward hooks (the blocks are not changed).

For one image and one block the figure shows the image as the network sees it, the feature
norm (L2 over the channels, per position) before and after the block, and the block's attention
map:

- SGE: the per-position gate, the mean over the groups of sigmoid(a). Read from the block's
  input x and output x * gate: per group and position, gate = <out, x> / <x, x>.
- spatial gates: CBAM's spatial gate, BAM's mean over the channels of sigmoid(Mc * Ms) (the
  block scales by 1 + that), GSoP's position attention (its 8 x 8 grid pooled to H x W).
- channel gates (SE, ECA, CGD, GC, GSoP channel mode, any other block): a channel gate has no
  spatial map, so the map is the ratio of the norms after / before, per position.
"""
from __future__ import annotations

import os.path as osp
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .complexity import attention_block_types

PANELS = ('image', 'feature norm before', 'feature norm after', 'attention')
"""The figure's panels, left to right."""


@dataclass(frozen=True)
class AttentionCapture:
    """What one block did to one image (maps cropped to the image, without padding).

    Attributes:
        block (str): The block's module name in the backbone (``layer3.5.sge``).
        block_type (str): Its class name.
        kind (str): What ``attention`` is, said in words (the figure's panel title).
        image (np.ndarray): The image as the network saw it (resized), (H, W, 3) RGB uint8.
        norm_before (np.ndarray): L2 norm over channels of the block's input, (h, w).
        norm_after (np.ndarray): The same of its output, (h, w).
        attention (np.ndarray): The attention map, (h, w).
    """

    block: str
    block_type: str
    kind: str
    image: np.ndarray
    norm_before: np.ndarray
    norm_after: np.ndarray
    attention: np.ndarray


def attention_blocks(backbone: nn.Module) -> list[str]:
    """Names of the backbone's attention blocks, in module order."""
    types = attention_block_types()
    return [name for name, module in backbone.named_modules() if isinstance(module, types)]


def default_block(backbone: nn.Module) -> str:
    """The last attention block of stage 3 (inside ``layer3`` or on its output), else the last.

    Raises:
        ValueError: If the backbone has no attention block.
    """
    names = attention_blocks(backbone)
    if not names:
        raise ValueError(f'the backbone ({type(backbone).__name__}) has no attention block, '
                         'so there is no attention map: give the config of a model with '
                         'plugins=[...].')
    stages = list(getattr(backbone, 'res_layers', []))
    after_stage = getattr(backbone, 'after_stage_plugin_names', [])
    if len(stages) >= 3:
        in_stage3 = [name for name in names if name.startswith(f'{stages[2]}.')
                     or (len(after_stage) >= 3 and name in after_stage[2])]
        if in_stage3:
            return in_stage3[-1]
    return names[-1]


def resolve_block(backbone: nn.Module, block: str | None) -> str:
    """``block`` checked against the backbone's attention blocks (``backbone.`` prefix allowed);
    the default block when None.

    Raises:
        ValueError: Naming the available attention blocks when ``block`` is not one.
    """
    if block is None:
        return default_block(backbone)
    name = block.removeprefix('backbone.')
    names = attention_blocks(backbone)
    if name in names:
        return name
    modules = dict(backbone.named_modules())
    what = (f'a {type(modules[name]).__name__}, not an attention block' if name in modules else
            'not a module of the backbone')
    available = ', '.join(names) if names else 'none (the backbone has no plugins)'
    raise ValueError(f'--block {block}: {what}. The attention blocks are: {available}.')


@contextmanager
def _hooks(modules: Sequence[nn.Module], store: dict) -> Iterator[None]:
    """Keep copies of each module's first input and its output in ``store[module]``.

    Copies: the Bottleneck adds the identity to a plugin's output in place, then applies an
    in-place ReLU.
    """
    def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        store[module] = (inputs[0].detach().clone(), output.detach().clone())

    handles = [module.register_forward_hook(keep) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _sge_gate(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    xg = x.float().reshape(n, module.groups, c // module.groups, h * w)
    yg = y.float().reshape_as(xg)
    energy = (xg * xg).sum(2)
    gate = (xg * yg).sum(2) / energy.where(energy > 0, torch.full_like(energy, float('nan')))
    return gate.nanmean(1).reshape(n, h, w)


def _attention_map(module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   inner: dict) -> tuple[str, torch.Tensor]:
    """(what the map is, the map (N, h, w)) from the block's input, output and inner hooks."""
    from mmattn.blocks import (
        BottleneckAttention,
        ConvolutionalBlockAttention,
        GlobalSecondOrderPooling,
        SpatialGroupEnhance,
    )
    if isinstance(module, SpatialGroupEnhance):
        return 'SGE gate: mean over groups of sigmoid(a)', _sge_gate(module, x, y)
    if isinstance(module, ConvolutionalBlockAttention):
        return 'CBAM spatial gate', inner[module.SpatialGate][1][:, 0].float()
    if isinstance(module, BottleneckAttention):
        channel = inner[module.channel_att.gate_c][1].float()[:, :, None, None]
        spatial = inner[module.spatial_att.gate_s][1].float()
        return ('BAM: mean over channels of sigmoid(Mc*Ms)',
                torch.sigmoid(channel * spatial).mean(1))
    if isinstance(module, GlobalSecondOrderPooling) and module.mode != 'channel':
        logits = inner[module.fc_adapt_channels_for_spatial][1].float()
        grid = int(round(logits.shape[1] ** 0.5))
        att = torch.sigmoid(logits).view(-1, 1, grid, grid)
        return ('GSoP position attention', F.adaptive_avg_pool2d(att, x.shape[2:])[:, 0])
    ratio = y.float().norm(dim=1) / x.float().norm(dim=1).clamp_min(1e-12)
    return 'channel gate: norm after / norm before\n(a channel gate has no spatial map)', ratio


def _inner_modules(module: nn.Module) -> list[nn.Module]:
    from mmattn.blocks import (
        BottleneckAttention,
        ConvolutionalBlockAttention,
        GlobalSecondOrderPooling,
    )
    if isinstance(module, ConvolutionalBlockAttention):
        return [module.SpatialGate]
    if isinstance(module, BottleneckAttention):
        return [module.channel_att.gate_c, module.spatial_att.gate_s]
    if isinstance(module, GlobalSecondOrderPooling) and module.mode != 'channel':
        return [module.fc_adapt_channels_for_spatial]
    return []


def _load_image(cfg, image: str) -> dict:
    """The config's test pipeline on ``image``, without the annotation loading."""
    from mmengine.dataset import Compose
    dataloader = cfg.get('test_dataloader') or cfg.get('val_dataloader')
    pipeline = dataloader.dataset.pipeline if dataloader else cfg.test_pipeline
    pipeline = [step for step in pipeline if 'LoadAnnotations' not in step['type']]
    return Compose(pipeline)(dict(img_path=image, img_id=0))


def _crop(feature: torch.Tensor, valid: tuple[int, int], padded: tuple[int, int]) -> np.ndarray:
    """Drop the rows and columns that see only the batch padding."""
    h, w = feature.shape[-2:]
    rows = min(h, -(-valid[0] * h // padded[0]))
    cols = min(w, -(-valid[1] * w // padded[1]))
    return feature[0, :rows, :cols].cpu().numpy()


@torch.no_grad()
def capture_attention(model: nn.Module, cfg, image: str,
                      block: str | None = None) -> AttentionCapture:
    """Run ``model``'s backbone on ``image`` (the config's test pipeline and the model's data
    preprocessor) and capture ``block`` (default: :func:`default_block`)."""
    backbone = model.backbone
    name = resolve_block(backbone, block)
    module = backbone.get_submodule(name)
    data = _load_image(cfg, image)
    batch = model.data_preprocessor(
        dict(inputs=[data['inputs']], data_samples=[data['data_samples']]), False)
    inputs = batch['inputs']
    store: dict = {}
    was_training = model.training
    model.eval()
    try:
        with _hooks([module, *_inner_modules(module)], store):
            backbone(inputs)
    finally:
        model.train(was_training)
    if module not in store:
        raise RuntimeError(f'{name} did not run in the forward pass of the backbone '
                           '(is its stage in out_indices / num_stages?).')
    x, y = store[module]
    kind, attention = _attention_map(module, x, y, store)
    valid = tuple(data['data_samples'].img_shape)
    padded = tuple(inputs.shape[-2:])
    picture = data['inputs'].permute(1, 2, 0).cpu().numpy()[..., ::-1]  # BGR -> RGB
    return AttentionCapture(
        block=name, block_type=type(module).__name__, kind=kind,
        image=np.ascontiguousarray(picture[:valid[0], :valid[1]]),
        norm_before=_crop(x.float().norm(dim=1), valid, padded),
        norm_after=_crop(y.float().norm(dim=1), valid, padded),
        attention=_crop(attention, valid, padded))


def _limits(values: np.ndarray) -> tuple[float, float]:
    """Colour limits; a map that is constant up to rounding shows as one colour, not noise."""
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if high - low <= 1e-3 * max(abs(low), abs(high), 1e-12):
        centre = (low + high) / 2
        span = max(1e-3 * abs(centre), 1e-12)
        low, high = centre - span, centre + span
    return low, high


def attention_figure(capture: AttentionCapture, title: str = ''):
    """A 1 x 4 grid (:data:`PANELS`); the two norm panels share one colour scale."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(16, 4.4), dpi=100)
    axes = fig.subplots(1, len(PANELS))
    axes[0].imshow(capture.image)
    axes[0].set_title('image (as the network sees it)')
    high = _limits(np.concatenate([capture.norm_before.ravel(), capture.norm_after.ravel()]))[1]
    for ax, values, label in ((axes[1], capture.norm_before, 'before'),
                              (axes[2], capture.norm_after, 'after')):
        shown = ax.imshow(values, cmap='viridis', vmin=0, vmax=high)
        ax.set_title(f'feature norm {label} {capture.block}')
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, format='%.3g')
    low, high = _limits(capture.attention)
    shown = axes[3].imshow(capture.attention, cmap='jet', vmin=low, vmax=high)
    axes[3].set_title(capture.kind, fontsize='medium')
    fig.colorbar(shown, ax=axes[3], fraction=0.046, pad=0.04, format='%.3g')
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f'{capture.block} ({capture.block_type})')
    fig.tight_layout()
    return fig


def visualize_attention(config: str, checkpoint: str, image: str, block: str | None = None,
                        out: str = 'attention.png'):
    """Load ``config`` with ``checkpoint`` on the CPU, capture ``block`` on ``image`` and save
    the grid to ``out``; returns the matplotlib Figure.

    The checkpoint is read by MMEngine's ``load_checkpoint`` through mmattn's weights_only
    allowlist (``import mmattn``).
    """
    from mmengine.registry import MODELS, DefaultScope
    from mmengine.runner import load_checkpoint

    from mmattn.apis import load_config
    if not osp.isfile(image):
        raise FileNotFoundError(f'image {image} does not exist.')
    cfg = load_config(config)
    cfg.model.backbone.init_cfg = None  # the checkpoint has every weight; nothing to download
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmdet')):
        model = MODELS.build(cfg.model)
        load_checkpoint(model, checkpoint, map_location='cpu', logger='silent')
        capture = capture_attention(model, cfg, image, block)
    name = osp.splitext(osp.basename(config))[0]
    fig = attention_figure(capture, f'{name}: {capture.block} ({capture.block_type}) on '
                                    f'{osp.basename(image)}')
    fig.savefig(out, format='png', metadata={
        'Title': f'{name} {capture.block}',
        'Description': 'panels: ' + ', '.join(PANELS) + f'; attention: {capture.kind}'})
    return fig
