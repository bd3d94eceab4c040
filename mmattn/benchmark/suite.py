"""The speed benchmark: each block at its paper placement in ResNet-50/101, against the plain net.

For every depth and setting, the plain backbone, each mmattn block and each block's reference
implementation (:mod:`mmattn.benchmark.references`) are built side by side in one process and
timed in interleaved rounds (:func:`~mmattn.benchmark.timing.interleaved`); a block's figure is
the median over rounds of its time divided by the plain backbone's time in the same round.

Settings (all :class:`~mmattn.backbones.AttnResNet` with its defaults, as a detector builds it:
``norm_eval=True``, so BN layers use their running statistics, every stage trainable):

- ``inference``: batch 8, 3x224x224, eval mode, no autograd.
- ``training``: batch 4, 3x224x224, train mode, forward + backward of the mean of the four
  stage outputs (the features an FPN takes).
- ``detection``: batch 1, 3x800x1333, eval mode, no autograd.
- ``memory``: the training step's peak allocated bytes and bytes kept for backward
  (:mod:`~mmattn.benchmark.memory`), once per model (they do not vary between runs).
- ``inference_amp`` / ``training_amp`` (autocast: fp16 on CUDA, bf16 on the CPU) and
  ``inference_channels_last`` / ``training_channels_last``: timed by default on CUDA, on the CPU
  when named.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from mmcv.cnn.bricks import ContextBlock

from ..backbones import AttnResNet
from . import references
from .memory import peak_bytes, saved_bytes
from .timing import Ratio, interleaved, keep_freed_memory, pair_ratios

PLAIN = 'plain'
IMPLEMENTATIONS = ('mmattn', 'reference')


@dataclass(frozen=True)
class BlockSpec:
    """One row group of the benchmark: a block at its paper placement.

    Attributes:
        name (str): Short name in the table.
        placement (str): The paper's placement, in words.
        plugin (dict): The ``plugins`` entry without ``cfg``: position, stages, blocks.
        mmattn (type | None): The mmattn block; None for a reference-only row (GC).
        reference (type): The reference implementation.
        reference_cfg (dict): Extra constructor arguments of the reference.
        targets (dict): The issue's CPU targets: ratio limits for 'inference', 'training',
            'memory' (peak bytes of the training step).
        gpu_targets (dict): The issue's CUDA target, keyed by setting: training <= 1.10 for the
            light blocks, in each training setting.
    """

    name: str
    placement: str
    plugin: dict
    mmattn: type | None
    reference: type
    reference_cfg: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)
    gpu_targets: dict = field(default_factory=dict)

    def plugins(self, implementation: str) -> list[dict]:
        block = self.mmattn if implementation == 'mmattn' else self.reference
        cfg = dict(type=block, **(self.reference_cfg if implementation == 'reference' else {}))
        return [dict(cfg=cfg, **self.plugin)]


def _block_specs() -> dict[str, BlockSpec]:
    from .. import blocks
    every_block = dict(position='after_conv3')
    # The GPU target for the light blocks (the channel and group gates).
    light = {f'training{suffix}': 1.10 for suffix in ('', '_amp', '_channels_last')}
    rows = [
        BlockSpec('SE', 'after bn3, every block', every_block, blocks.SqueezeExcitation,
                  references.ReferenceSE, targets=dict(inference=1.04, training=1.07,
                                                       memory=1.08), gpu_targets=light),
        BlockSpec('ECA', 'after bn3, every block', every_block, blocks.EfficientChannelAttention,
                  references.ReferenceECA, targets=dict(inference=1.04, training=1.07,
                                                        memory=1.08), gpu_targets=light),
        BlockSpec('SGE', 'after bn3, every block', every_block, blocks.SpatialGroupEnhance,
                  references.ReferenceSGE, targets=dict(inference=1.05, training=1.10,
                                                        memory=1.10), gpu_targets=light),
        BlockSpec('CGD', 'conv1 -> CGD -> bn1, every block',
                  dict(position='after_conv1_pre_norm'), blocks.CompactGlobalDescriptor,
                  references.ReferenceCGD, targets=dict(inference=1.05, training=1.06,
                                                        memory=1.08), gpu_targets=light),
        BlockSpec('CBAM', 'after bn3, every block', every_block,
                  blocks.ConvolutionalBlockAttention, references.ReferenceCBAM,
                  targets=dict(inference=1.08, training=1.12, memory=1.15)),
        BlockSpec('GSoP', 'after bn3, last block of each stage',
                  dict(position='after_conv3', blocks='last'), blocks.GlobalSecondOrderPooling,
                  references.ReferenceGSoP, targets=dict(inference=1.06, training=1.10,
                                                         memory=1.10)),
        BlockSpec('BAM', 'end of stages 1-3',
                  dict(position='after_stage', stages=(True, True, True, False)),
                  blocks.BottleneckAttention, references.ReferenceBAM),
        BlockSpec('GC', 'after bn3, stages 2-4 (mmdet GCNet configs)',
                  dict(position='after_conv3', stages=(False, True, True, True)), None,
                  ContextBlock, reference_cfg=dict(ratio=1 / 16)),
    ]
    return {row.name: row for row in rows}


BLOCKS = _block_specs()


@dataclass(frozen=True)
class Setting:
    """One timed setting.

    Attributes:
        name (str): Key in the results.
        shape (tuple): Input shape (N, C, H, W).
        training (bool): Forward + backward in train mode, else inference without autograd.
        amp (bool): Under autocast (:func:`amp_dtype`).
        channels_last (bool): Model and input in channels_last memory format.
    """

    name: str
    shape: tuple[int, int, int, int]
    training: bool
    amp: bool = False
    channels_last: bool = False


def all_settings(image: int = 224, detection: tuple[int, int] = (800, 1333)) -> list[Setting]:
    """Every setting: the issue's three, then AMP and channels_last for inference and training.

    AMP is autocast to :func:`amp_dtype`: fp16 on CUDA, bf16 on other devices.
    """
    settings = [Setting('inference', (8, 3, image, image), False),
                Setting('training', (4, 3, image, image), True),
                Setting('detection', (1, 3, *detection), False)]
    for base in settings[:2]:
        settings.append(Setting(f'{base.name}_amp', base.shape, base.training, amp=True))
        settings.append(Setting(f'{base.name}_channels_last', base.shape, base.training,
                                channels_last=True))
    return settings


def default_settings(device: torch.device, image: int = 224,
                     detection: tuple[int, int] = (800, 1333)) -> list[Setting]:
    """What :func:`run` times when no settings are named: on CUDA all of them, elsewhere the
    issue's three (the CPU runs AMP and channels_last when they are named)."""
    settings = all_settings(image, detection)
    if device.type == 'cuda':
        return settings
    return [s for s in settings if not (s.amp or s.channels_last)]


def amp_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the AMP settings' autocast: fp16 on CUDA, bf16 elsewhere (the CPU's
    autocast dtype)."""
    return torch.float16 if device.type == 'cuda' else torch.bfloat16


def build(depth: int, plugins: list[dict] | None, base_channels: int = 64) -> AttnResNet:
    """The backbone under test (PyTorch's default init; weights do not change the timings)."""
    return AttnResNet(depth, plugins=plugins, base_channels=base_channels)


def _candidates(blocks: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Model key -> (block, implementation), the plain backbone first."""
    keys = {PLAIN: (PLAIN, PLAIN)}
    for name in blocks:
        spec = BLOCKS[name]
        for implementation in IMPLEMENTATIONS:
            if implementation == 'mmattn' and spec.mmattn is None:
                continue
            keys[f'{name}/{implementation}'] = (name, implementation)
    return keys


def _step(model: torch.nn.Module, x: torch.Tensor, setting: Setting,
          device: torch.device) -> Callable[[], object]:
    autocast = (torch.autocast(device.type, dtype=amp_dtype(device)) if setting.amp
                else contextlib.nullcontext())

    if setting.training:
        def run() -> torch.Tensor:
            for param in model.parameters():
                param.grad = None
            with autocast:
                loss = sum(out.float().mean() for out in model(x))
            loss.backward()
            return loss
    else:
        def run() -> tuple[torch.Tensor, ...]:
            with torch.no_grad(), autocast:
                return model(x)
    return run


def _machine(device: torch.device) -> dict:
    info = dict(platform=platform.platform(), python=platform.python_version(),
                torch=torch.__version__, threads=torch.get_num_threads(),
                cpu=_cpu_name(), cores=os.cpu_count(), device=str(device))
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    return platform.processor() or 'unknown CPU'


def run(depths: Sequence[int] = (50, 101), blocks: Sequence[str] | None = None,
        settings: Sequence[str] | None = None, rounds: int = 7, warmup: int = 1,
        repeat: int = 3, device: str = 'cpu', base_channels: int = 64, image: int = 224,
        detection: tuple[int, int] = (800, 1333), memory: bool = True,
        keep_memory: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark; returns the results as a JSON-ready dict.

    Args:
        depths: ResNet depths.
        blocks: Names from :data:`BLOCKS`; all when None.
        settings: Setting names (see :func:`all_settings`); when None, those of
            :func:`default_settings`.
        rounds: Interleaved timing rounds per setting.
        warmup: Untimed calls of every model before the rounds.
        repeat: Back-to-back calls per timed call; the fastest counts.
        device: Where to run.
        base_channels: Backbone width (64 is ResNet; smaller only for quick checks).
        image: Side of the square classification-size input.
        detection: (H, W) of the detection-size input.
        memory: Also measure training memory.
        keep_memory: Keep freed memory in the process (glibc; see
            :func:`~mmattn.benchmark.timing.keep_freed_memory`).
        log: Progress messages.
    """
    torch_device = torch.device(device)
    malloc = 'default'
    if keep_memory:
        malloc = 'freed memory kept' if keep_freed_memory() else 'default (not glibc)'
    blocks = list(BLOCKS) if blocks is None else list(blocks)
    unknown = sorted(set(blocks) - set(BLOCKS))
    if unknown:
        raise ValueError(f'unknown blocks {unknown}; choose from {", ".join(BLOCKS)}')
    available = {s.name: s for s in all_settings(image, detection)}
    if settings is None:
        chosen = [s.name for s in default_settings(torch_device, image, detection)]
    else:
        chosen = list(settings)
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ValueError(f'unknown settings {unknown}; choose from {", ".join(available)}')
    candidates = _candidates(blocks)
    results = dict(machine=_machine(torch_device),
                   config=dict(depths=list(depths), blocks=blocks, settings=chosen,
                               rounds=rounds, warmup=warmup, repeat=repeat, malloc=malloc,
                               amp_dtype=str(amp_dtype(torch_device)).removeprefix('torch.'),
                               base_channels=base_channels,
                               shapes={name: list(available[name].shape) for name in chosen}),
                   placements={name: BLOCKS[name].placement for name in blocks},
                   targets=_targets(blocks, torch_device),
                   results={})
    for depth in depths:
        torch.manual_seed(0)
        models = {key: build(depth, None if key == PLAIN else
                             BLOCKS[block].plugins(implementation), base_channels)
                  for key, (block, implementation) in candidates.items()}
        models = {key: model.to(torch_device) for key, model in models.items()}
        depth_results: dict[str, dict] = {}
        for name in chosen:
            setting = available[name]
            depth_results[name] = _time_setting(models, setting, rounds, warmup, repeat,
                                                torch_device, log, depth)
        if memory:
            depth_results['memory'] = _measure_memory(models, available['training'].shape,
                                                      torch_device, log, depth)
        results['results'][str(depth)] = depth_results
    return results


def _targets(blocks: Sequence[str], device: torch.device) -> dict[str, dict]:
    """The issue's targets of these blocks on this device (CUDA's or the CPU's)."""
    targets = {name: BLOCKS[name].gpu_targets if device.type == 'cuda' else BLOCKS[name].targets
               for name in blocks}
    return {name: limits for name, limits in targets.items() if limits}


def _time_setting(models: dict[str, torch.nn.Module], setting: Setting, rounds: int,
                  warmup: int, repeat: int, device: torch.device, log: Callable[[str], None],
                  depth: int) -> dict:
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    x = torch.randn(setting.shape, device=device).to(memory_format=memory_format)
    runs = {}
    for key, model in models.items():
        model.train(setting.training)
        model.to(memory_format=memory_format)
        runs[key] = _step(model, x, setting, device)
    log(f'R{depth} {setting.name} {tuple(setting.shape)}: {len(runs)} models x {rounds} rounds')
    times = interleaved(runs, PLAIN, rounds, warmup, device, repeat,
                        on_round=lambda r: log(f'  round {r + 1}/{rounds}'))
    ratios = pair_ratios(times, PLAIN)
    base = statistics.median(times[PLAIN])
    for model in models.values():
        model.to(memory_format=torch.contiguous_format)
    return dict(plain_seconds=base, times=times,
                ratios={key: ratio.__dict__ for key, ratio in ratios.items()})


def _measure_memory(models: dict[str, torch.nn.Module], shape: tuple[int, ...],
                    device: torch.device, log: Callable[[str], None], depth: int) -> dict:
    log(f'R{depth} memory, training step {tuple(shape)}')
    x = torch.randn(shape, device=device)
    measured = {}
    for key, model in models.items():
        model.train()
        step = _forward_loss(model, x)
        exclude = [*model.parameters(), *model.buffers(), x]
        measured[key] = dict(peak=peak_bytes(step, device), saved=saved_bytes(step, exclude))
    base = measured[PLAIN]
    return dict(bytes=measured,
                ratios={key: dict(peak=value['peak'] / base['peak'],
                                  saved=value['saved'] / base['saved'])
                        for key, value in measured.items() if key != PLAIN})


def _forward_loss(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The training step's forward pass: clears the gradients, returns the loss."""
    def forward() -> torch.Tensor:
        for param in model.parameters():
            param.grad = None
        return sum(out.float().mean() for out in model(x))
    return forward


def ratio_of(results: dict, depth: int, setting: str, key: str) -> Ratio | None:
    """The :class:`Ratio` of one model in one setting, or None when not measured."""
    entry = results['results'].get(str(depth), {}).get(setting, {}).get('ratios', {}).get(key)
    return None if entry is None else Ratio(**entry)
