"""configs/pretrain: the ImageNet configs build, count and place blocks as the papers do."""
import functools
import pathlib
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope
from mmpretrain.registry import MODELS

import mmattn  # noqa: F401  (registers AttnResNet and the blocks)

PRETRAIN = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'pretrain'
CONFIGS = sorted(path.stem for path in PRETRAIN.glob('*.py'))
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

# Whole classifier (1000-class fc), millions rounded to 2 places: papers.md section 2 unless noted.
PARAMS = {
    'resnet50': 25.56,
    'resnet50_se': 28.09,
    'resnet50_sge': 25.56,
    'resnet50_cbam': 28.09,
    'resnet50_bam': 25.92,
    'resnet50_cgd': 25.58,  # ResNet-50 + 0.02M (CGD paper)
    'resnet50_gsop': 28.29,  # GSoP-Net1 as the authors' layer shapes count it
    'resnet50_eca': 25.56,  # ResNet-50 + 80 weights (ECA README)
    'resnet50_gc': 28.08,  # GCNet paper
    'resnet101': 44.55,
    'resnet101_se': 49.33,
    'resnet101_sge': 44.55,
    'resnet101_cbam': 49.33,
}
# Detection backbones (fc removed): papers.md sections 1.1 and 1.2.
BACKBONE_PARAMS = {
    'resnet50': 23.51,
    'resnet50_se': 26.04,
    'resnet50_cbam': 26.04,
    'resnet50_sge': 23.51,
    'resnet50_bam': 23.87,
    'resnet101': 42.50,
    'resnet101_se': 47.28,
}


@pytest.fixture(autouse=True)
def _native_single_thread():
    # oneDNN compiles a kernel for every new convolution shape (about 1 s of CPU per ResNet-50
    # here); torch's native kernels run these single 64x64 images faster. A second intra-op
    # thread buys nothing at this size and, on a busy 2-core machine, spins waiting for the
    # first: measured 0.04 s per ResNet-50 forward on one thread, 1-2 s on two.
    enabled, threads = torch.backends.mkldnn.enabled, torch.get_num_threads()
    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = enabled


@pytest.fixture(scope='module', autouse=True)
def _free_models():
    yield
    build.cache_clear()


@functools.cache
def load(name: str) -> Config:
    return Config.fromfile(str(PRETRAIN / f'{name}.py'))


@functools.cache
def build(name: str) -> torch.nn.Module:
    """The config's classifier, in eval mode (GSoP's and BAM's BNs refuse batch 1 in training)."""
    # The configs' default scope, without leaving it set for the rest of the test session.
    with DefaultScope.overwrite_default_scope(load(name).default_scope):
        return MODELS.build(load(name).model).eval()


def millions(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)


def every_block(depth: int, abbr: str, stages=(1, 2, 3, 4)) -> set[str]:
    return {f'backbone.layer{stage}.{block}.{abbr}'
            for stage in stages for block in range(STAGE_BLOCKS[depth][stage - 1])}


def last_blocks(depth: int, abbr: str) -> set[str]:
    return {f'backbone.layer{stage}.{num - 1}.{abbr}'
            for stage, num in enumerate(STAGE_BLOCKS[depth], start=1)}


def hosts(model: torch.nn.Module, abbr: str) -> set[str]:
    """The modules named ``abbr`` (plus a stage number) that own state-dict keys."""
    found = set()
    for key in model.state_dict():
        parts = key.split('.')
        for i, part in enumerate(parts):
            if re.fullmatch(rf'{abbr}\d*', part):
                found.add('.'.join(parts[:i + 1]))
                break
    return found


def test_every_config_has_a_parameter_target():
    assert sorted(PARAMS) == CONFIGS


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_mmattn_over_mmpretrain_imagenet(name):
    cfg = load(name)
    assert cfg.custom_imports == dict(imports=['mmattn'], allow_failed_imports=False)
    assert cfg.default_scope == 'mmpretrain'
    assert cfg.model.type == 'ImageClassifier'
    assert cfg.model.backbone.type == 'AttnResNet'
    assert cfg.model.backbone.out_indices == (3, )
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        assert loader.dataset.type == 'ImageNet'
        assert loader.dataset.data_root == 'data/imagenet'
    assert cfg.test_dataloader.dataset.split == 'val'


# (config, epochs, lr milestones, images per GPU (8 GPUs), base_batch_size of lr 0.1)
@pytest.mark.parametrize('name, epochs, milestones, per_gpu, base_batch', [
    *[(name, 100, [30, 60, 90], 32, 256)
      for name in CONFIGS if name not in ('resnet50_cgd', 'resnet50_gsop')],
    ('resnet50_cgd', 101, [31, 61, 81], 32, 256),
    ('resnet50_gsop', 95, [30, 60, 90], 48, 384),
])
def test_recipe(name, epochs, milestones, per_gpu, base_batch):
    cfg = load(name)
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.momentum) == ('SGD', 0.1, 0.9)
    assert optimizer.weight_decay == 1e-4
    assert (cfg.param_scheduler.type, cfg.param_scheduler.gamma) == ('MultiStepLR', 0.1)
    assert cfg.param_scheduler.milestones == milestones
    assert cfg.train_cfg.max_epochs == epochs
    assert cfg.train_dataloader.batch_size == per_gpu
    assert cfg.auto_scale_lr.base_batch_size == base_batch == 8 * per_gpu


@pytest.mark.parametrize('name', CONFIGS)
def test_classifier_runs_in_tensor_mode(name):
    with torch.no_grad():
        scores = build(name)(torch.randn(1, 3, 64, 64), mode='tensor')
    assert scores.shape == (1, 1000)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize('name', CONFIGS)
def test_training_uses_batch_statistics_and_trains_every_parameter(name):
    # mmdet's ResNet defaults to norm_eval=True (a detector's frozen BN), which would leave a
    # network trained from scratch unnormalised.
    model = build(name)
    try:
        model.train()
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert norms and all(m.training for m in norms)
    finally:
        model.eval()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize('name, expected', sorted(PARAMS.items()))
def test_classifier_params_match_the_papers(name, expected):
    assert millions(build(name)) == expected


@pytest.mark.parametrize('name, expected', sorted(BACKBONE_PARAMS.items()))
def test_detection_backbone_params_match_the_papers(name, expected):
    assert millions(build(name).backbone) == expected


def test_eca_adds_the_released_models_80_weights():
    extra = sum(p.numel() for p in build('resnet50_eca').parameters()) - sum(
        p.numel() for p in build('resnet50').parameters())
    assert extra == 3 * 3 + 5 * 4 + 5 * 6 + 7 * 3 == 80


@pytest.mark.parametrize('depth', [50, 101])
def test_baseline_keeps_mmpretrain_resnet_keys(depth):
    # So mmpretrain's and torchvision-converted ResNet checkpoints load unchanged.
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        stock = MODELS.build(dict(type='ResNet', depth=depth, out_indices=(3, )))
    ours = build(f'resnet{depth}').backbone.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {
        k: v.shape for k, v in stock.state_dict().items()}


@pytest.mark.parametrize('name, abbr, expected', [
    ('resnet50_se', 'se', every_block(50, 'se')),
    ('resnet50_sge', 'sge', every_block(50, 'sge')),
    ('resnet50_cbam', 'cbam', every_block(50, 'cbam')),
    ('resnet50_eca', 'eca', every_block(50, 'eca')),
    ('resnet50_cgd', 'cgd', every_block(50, 'cgd')),
    ('resnet50_gsop', 'gsop', last_blocks(50, 'gsop')),
    ('resnet50_bam', 'bam', {'backbone.bam1', 'backbone.bam2', 'backbone.bam3'}),
    ('resnet50_gc', 'context_block', every_block(50, 'context_block', stages=(2, 3, 4))),
    ('resnet101_se', 'se', every_block(101, 'se')),
    ('resnet101_sge', 'sge', every_block(101, 'sge')),
    ('resnet101_cbam', 'cbam', every_block(101, 'cbam')),
])
def test_blocks_sit_where_the_papers_place_them(name, abbr, expected):
    model = build(name)
    assert hosts(model, abbr) == expected
    # Nothing else was added: the rest is the plain ResNet of the same depth.
    base = build('resnet101' if name.startswith('resnet101') else 'resnet50')
    plain = {k for k in model.state_dict() if not any(k.startswith(h + '.') for h in expected)}
    assert plain == set(base.state_dict())


def test_gsop_net1_keeps_the_last_stage_at_stride_1():
    with torch.no_grad():
        (c5, ) = build('resnet50_gsop').backbone(torch.randn(1, 3, 64, 64))
    assert c5.shape == (1, 2048, 4, 4)  # stride 16; the standard ResNet-50 gives 2x2


def test_cgd_runs_between_conv1_and_bn1():
    block = build('resnet50_cgd').backbone.layer2[0]
    seen = {}
    hooks = [
        block.conv1.register_forward_hook(lambda m, i, o: seen.setdefault('conv1', o)),
        block.cgd.register_forward_hook(lambda m, i, o: seen.update(cgd_in=i[0], cgd_out=o)),
        block.bn1.register_forward_pre_hook(lambda m, i: seen.setdefault('bn1', i[0])),
    ]
    try:
        with torch.no_grad():
            block(torch.randn(1, 256, 9, 11))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen['cgd_in'] is seen['conv1']
    assert seen['bn1'] is seen['cgd_out']


def test_cgd_weight_decay_is_4e5_on_exactly_the_cgd_parameters():
    cfg, model = load('resnet50_cgd'), build('resnet50_cgd')
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        optimizer = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)]: group['weight_decay']
             for group in optimizer.param_groups for p in group['params']}
    assert sorted(decay) == sorted(names.values())
    cgd = {n for n in decay if decay[n] != pytest.approx(1e-4)}
    assert cgd == {f'{block}.{w}' for block in every_block(50, 'cgd')
                   for w in ('w0', 'w1', 'w2', 'bias0', 'bias1', 'bias2')}
    assert all(decay[n] == pytest.approx(4e-5) for n in cgd)
