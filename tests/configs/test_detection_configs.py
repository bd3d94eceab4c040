"""The detection configs: one per detector, depth and block, each on the recipe and placement its
paper gives (papers.md, written out here independently of the configs), each building its full
model, and each training one iteration and evaluating once, narrowed, on tiny synthetic data."""
from __future__ import annotations

import ast
import copy
import functools
import math
import pathlib

import mmengine.config.utils as config_utils
import pytest
import torch
import yaml
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.runner import Runner

import mmattn
from mmattn.datasets import CLASSES, make_synthetic_coco
from mmattn.preflight import check_backbone_plugins

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / 'configs'
DETECTORS = ('faster_rcnn', 'cascade_rcnn', 'retinanet')
DEPTHS = ('r50', 'r101')
BLOCKS = ('none', 'se', 'sge', 'cgd', 'gsop', 'cbam', 'bam', 'eca', 'gc')
NAMES = [f'{detector}_{depth}' + ('' if block == 'none' else f'_{block}')
         for detector in DETECTORS for depth in DEPTHS for block in BLOCKS]
STAGE_BLOCKS = {'r50': (3, 4, 6, 3), 'r101': (3, 4, 23, 3)}

# papers.md section 3 and README's block table: the plugin entry and the modules it must create.
ALL_STAGES = (True, ) * 4
PLUGINS = {
    'none': None,
    'se': dict(cfg=dict(type='SqueezeExcitation', rd_ratio=1 / 16), position='after_conv3'),
    'sge': dict(cfg=dict(type='SpatialGroupEnhance', groups=64), position='after_conv3'),
    'cgd': dict(cfg=dict(type='CompactGlobalDescriptor', mode='cascade'),
                position='after_conv1_pre_norm'),
    'gsop': dict(cfg=dict(type='GlobalSecondOrderPooling', mode='channel'),
                 position='after_conv3', blocks='last'),
    'cbam': dict(cfg=dict(type='ConvolutionalBlockAttention', rd_ratio=1 / 16),
                 position='after_conv3'),
    'bam': dict(cfg=dict(type='BottleneckAttention', rd_ratio=1 / 16, dilation=4),
                position='after_stage', stages=(True, True, True, False)),
    'eca': dict(cfg=dict(type='EfficientChannelAttention'), position='after_conv3'),
    # GCNet as mmdet's gcnet configs place it: after conv3, stages 2-4.
    'gc': dict(cfg=dict(type='ContextBlock', ratio=1 / 16), position='after_conv3',
               stages=(False, True, True, True)),
}
# block: (module name, stages that hold it, which blocks of those stages)
MODULES = {
    'se': ('se', ALL_STAGES, 'all'), 'sge': ('sge', ALL_STAGES, 'all'),
    'cgd': ('cgd', ALL_STAGES, 'all'), 'gsop': ('gsop', ALL_STAGES, 'last'),
    'cbam': ('cbam', ALL_STAGES, 'all'), 'eca': ('eca', ALL_STAGES, 'all'),
    'gc': ('context_block', (False, True, True, True), 'all'),
}

# Backbone parameters without fc, in millions, from papers.md 1.1/1.2. "derived": the ImageNet
# count of section 2 minus the 2.049M of the 1000-class fc.
BACKBONE_PARAMS = {
    ('r50', 'none'): 23.51, ('r50', 'sge'): 23.51, ('r50', 'se'): 26.04, ('r50', 'cbam'): 26.04,
    ('r50', 'bam'): 23.87, ('r101', 'none'): 42.50, ('r101', 'se'): 47.28, ('r101', 'sge'): 42.50,
    ('r101', 'cbam'): 47.28,  # derived: 49.33 - 2.049
    ('r50', 'gsop'): 26.24,  # derived: 28.29 (the authors' four blocks) - 2.049
}
CGD_EXTRA_PARAMS_R50 = 0.02  # papers.md 1.3: "+0.02M params" on res2-res5
R50_PARAMS = 25_557_032 - 2_049_000  # ResNet-50 without its 1000-class fc

SGE_PAPER_ROWS = ('none', 'se', 'sge', 'cbam', 'bam')
NECK = 32  # FPN width of the narrowed copies


def split_name(name: str) -> tuple[str, str, str]:
    for detector in DETECTORS:
        if name.startswith(detector + '_'):
            depth, _, block = name[len(detector) + 1:].partition('_')
            return detector, depth, block or 'none'
    raise ValueError(name)


def expected_recipe(detector: str, depth: str, block: str) -> dict:
    """papers.md 1.5: the SGE paper's rows, the CGD paper's rows, and mmdet's 1x for the rest."""
    lr = 0.01 if detector == 'retinanet' else 0.02
    if block in SGE_PAPER_ROWS:
        epochs, steps = (20, [16, 19]) if detector == 'cascade_rcnn' else (24, [16, 22])
        one_image = depth == 'r101' or (detector == 'retinanet' and block in ('bam', 'cbam'))
        if one_image and detector != 'retinanet':
            lr = 0.01  # the two-stage R101 rows: 1 image/GPU at lr 0.01
        return dict(epochs=epochs, steps=steps, lr=lr, per_gpu=1 if one_image else 2,
                    warmup_from=1 / 3, clip=35, cgd_decay_mult=None)
    if block == 'cgd':
        return dict(epochs=12, steps=[8, 11], lr=lr, per_gpu=2, warmup_from=1 / 3, clip=35,
                    cgd_decay_mult=0.5)  # 5e-5 = 1e-4 x 0.5
    return dict(epochs=12, steps=[8, 11], lr=lr, per_gpu=2, warmup_from=0.001, clip=None,
                cgd_decay_mult=None)


@pytest.fixture(scope='module', autouse=True)
def _fast_cpu():
    # One thread: on these tiny tensors a second thread only spins (and costs a lot when other
    # processes share the 2 cores). oneDNN compiles a kernel per new conv shape; native is faster.
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    # mmengine re-reads all of mmdet's ~100 metafiles for every `mmdet::` base (0.2 s each).
    original = config_utils.load
    config_utils.load = functools.cache(original)
    yield
    config_utils.load = original
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn


@functools.cache
def _load(name: str) -> Config:
    cfg = Config.fromfile(str(CONFIGS / f'{name}.py'))
    # Without yapf: each Runner prints and dumps its config four times (about 1 s a config).
    # (fromfile's own format_python_code=False only reaches lazy-import configs.)
    return Config(cfg.to_dict(), cfg_text=cfg.text, filename=cfg.filename,
                  format_python_code=False)


def load(name: str) -> Config:
    """A fresh copy of a config (each file is parsed once per session)."""
    return copy.deepcopy(_load(name))


# ------------------------------------------------------------------------------------ the files


def test_every_detector_depth_and_block_has_a_config():
    assert sorted(path.stem for path in CONFIGS.glob('*.py')) == sorted(NAMES)


@pytest.mark.parametrize('name', NAMES)
def test_config_says_only_what_differs_from_its_base(name):
    tree = ast.parse((CONFIGS / f'{name}.py').read_text())
    assigned = [target.id for node in tree.body if isinstance(node, ast.Assign)
                for target in node.targets]
    assert assigned[0] == '_base_'
    assert set(assigned) <= {'_base_', 'model', 'train_dataloader', 'optim_wrapper',
                             'auto_scale_lr'}
    assert len(assigned) == len(set(assigned))


# ------------------------------------------------------------------- recipe and placement


@pytest.mark.parametrize('name', NAMES)
def test_backbone_and_placement(name):
    _, depth, block = split_name(name)
    cfg = load(name)
    backbone = cfg.model.backbone
    assert cfg.custom_imports == dict(imports=['mmattn'], allow_failed_imports=False)
    assert backbone.type == 'AttnResNet'
    assert backbone.depth == int(depth[1:])
    assert (backbone.frozen_stages, backbone.norm_eval, backbone.style) == (1, True, 'pytorch')
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=f'torchvision://resnet{depth[1:]}')
    plugins = backbone.get('plugins')
    expected = PLUGINS[block]
    assert (plugins is None) if expected is None else (plugins == [expected])
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        check_backbone_plugins(backbone)  # what tools/train.py checks before building


@pytest.mark.parametrize('name', NAMES)
def test_recipe(name):
    recipe = expected_recipe(*split_name(name))
    cfg = load(name)
    warmup, steps = cfg.param_scheduler
    assert cfg.train_cfg.max_epochs == recipe['epochs']
    assert (warmup.type, warmup.by_epoch, warmup.begin, warmup.end) == ('LinearLR', False, 0, 500)
    assert warmup.start_factor == pytest.approx(recipe['warmup_from'])
    assert (steps.type, steps.by_epoch, steps.end, steps.milestones, steps.gamma) == (
        'MultiStepLR', True, recipe['epochs'], recipe['steps'], 0.1)
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.momentum, optimizer.weight_decay) == (
        'SGD', recipe['lr'], 0.9, 1e-4)
    clip = cfg.optim_wrapper.get('clip_grad')
    assert (clip is None) if recipe['clip'] is None else (clip == dict(max_norm=35, norm_type=2))
    paramwise = cfg.optim_wrapper.get('paramwise_cfg')
    if recipe['cgd_decay_mult'] is None:
        assert paramwise is None
    else:
        assert paramwise == dict(custom_keys={'.cgd.': dict(decay_mult=0.5)})
    # --auto-scale-lr scales from the batch the lr was set for: 8 GPUs x images per GPU.
    assert cfg.train_dataloader.batch_size == recipe['per_gpu']
    assert cfg.auto_scale_lr.base_batch_size == 8 * recipe['per_gpu']
    resize = [t for t in cfg.train_pipeline if t.type == 'Resize']
    assert [(t.scale, t.keep_ratio) for t in resize] == [((1333, 800), True)]


@functools.cache
def metafile_metadata() -> dict[str, dict]:
    models = yaml.safe_load((CONFIGS / 'metafile.yml').read_text())['Models']
    return {model['Name']: model['Metadata'] for model in models}


@pytest.mark.parametrize('name', NAMES)
def test_metafile_metadata_is_the_configs(name):
    metadata = metafile_metadata()[name]
    cfg = _load(name)
    per_gpu = cfg.train_dataloader.batch_size
    assert metadata['Epochs'] == cfg.train_cfg.max_epochs
    assert metadata['Batch Size'] == cfg.auto_scale_lr.base_batch_size
    assert metadata['Training Resources'] == f'8 GPUs x {per_gpu} image{"s" * (per_gpu > 1)}'


# -------------------------------------------------------------------------- the full model


@pytest.mark.parametrize('name', NAMES)
def test_full_model_builds_with_the_papers_backbone(name):
    _, depth, block = split_name(name)
    with torch.device('meta'):  # the full-width structure, without allocating its weights
        backbone = MODELS.build(load(name).model).backbone
    params = sum(p.numel() for p in backbone.parameters())
    if (depth, block) in BACKBONE_PARAMS:
        assert round(params / 1e6, 2) == BACKBONE_PARAMS[depth, block]
    if (depth, block) == ('r50', 'cgd'):
        assert round((params - R50_PARAMS) / 1e6, 2) == CGD_EXTRA_PARAMS_R50
    assert plugin_modules(backbone, block) == expected_modules(depth, block)


def plugin_modules(backbone: torch.nn.Module, block: str) -> set[str]:
    if block == 'none':
        return set()
    cls = MODELS.get(PLUGINS[block]['cfg']['type'])
    return {name for name, module in backbone.named_modules() if isinstance(module, cls)}


def expected_modules(depth: str, block: str) -> set[str]:
    if block == 'none':
        return set()
    if block == 'bam':
        return {'bam1', 'bam2', 'bam3'}
    abbr, stages, which = MODULES[block]
    return {f'layer{stage + 1}.{index}.{abbr}'
            for stage, (chosen, count) in enumerate(zip(stages, STAGE_BLOCKS[depth], strict=True))
            if chosen
            for index in (range(count) if which == 'all' else (count - 1, ))}


# ------------------------------------------------------- one iteration and one evaluation


@pytest.fixture(scope='module')
def data_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp('configs') / 'data'
    make_synthetic_coco(root, num_train=2, num_val=1, image_size=(128, 128))
    return f'{root}/'


def narrowed(cfg: Config, data_root: str, work_dir: str) -> Config:
    """The config at base_channels=16 and FPN width 32, 4 classes, from scratch, on 64x64 images:
    the same detector, blocks, schedule and optimizer, small enough for a CPU test."""
    model = cfg.model
    model.backbone.update(base_channels=16, init_cfg=None)
    model.neck.update(in_channels=[64, 128, 256, 512], out_channels=NECK)
    if 'bbox_head' in model:  # RetinaNet
        model.bbox_head.update(in_channels=NECK, feat_channels=NECK, stacked_convs=1,
                               num_classes=len(CLASSES))
        model.test_cfg.score_thr = 0.0  # an untrained head scores below 0.05: keep detections
    else:
        model.rpn_head.update(in_channels=NECK, feat_channels=NECK)
        model.roi_head.bbox_roi_extractor.out_channels = NECK
        heads = model.roi_head.bbox_head
        for head in heads if isinstance(heads, list) else [heads]:
            head.update(in_channels=NECK, fc_out_channels=NECK, num_classes=len(CLASSES))
        model.test_cfg.rcnn.score_thr = 0.0
    for split in ('train', 'val'):
        loader = cfg[f'{split}_dataloader']
        # Both training images in one batch: one iteration.
        loader.update(batch_size=2 if split == 'train' else 1, num_workers=0,
                      persistent_workers=False)
        loader.dataset.update(
            data_root=data_root, ann_file=f'annotations/instances_{split}.json',
            data_prefix=dict(img=f'{split}/'), metainfo=dict(classes=CLASSES),
            serialize_data=False)  # serialising runs gc.collect(), slow in a long session
        for transform in loader.dataset.pipeline:
            if transform.type == 'Resize':
                transform.scale = (64, 64)
    cfg.test_dataloader = cfg.val_dataloader
    cfg.val_evaluator.ann_file = f'{data_root}annotations/instances_val.json'
    cfg.test_evaluator = cfg.val_evaluator
    cfg.train_cfg.update(max_epochs=1, val_interval=1)
    cfg.default_hooks.checkpoint = None
    name = pathlib.Path(work_dir).name
    cfg.visualizer.update(name=name, vis_backends=[])
    cfg.update(work_dir=work_dir, experiment_name=name, log_level='WARNING',
               randomness=dict(seed=0))
    return cfg


@pytest.mark.parametrize('name', NAMES)
def test_trains_one_iteration_and_evaluates(name, data_root, tmp_path):
    runner = Runner.from_cfg(narrowed(load(name), data_root, str(tmp_path / name)))
    runner.train()  # one iteration, then the evaluation at the end of the epoch

    hub = runner.message_hub
    assert runner.iter == 1
    assert math.isfinite(hub.get_scalar('train/loss').current())
    for key in ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s', 'bbox_mAP_m',
                'bbox_mAP_l'):
        assert math.isfinite(hub.get_scalar(f'val/coco/{key}').current())
    # paramwise_cfg reached the optimizer: 5e-5 on CGD's parameters, 1e-4 everywhere else.
    names = {id(param): pname for pname, param in runner.model.named_parameters()}
    decay = {names[id(group['params'][0])]: group['weight_decay']
             for group in runner.optim_wrapper.optimizer.param_groups}
    assert {wd for pname, wd in decay.items() if '.cgd.' not in pname} == {1e-4}
    cgd = sorted({wd for pname, wd in decay.items() if '.cgd.' in pname})
    assert cgd == ([pytest.approx(5e-5)] if name.endswith('_cgd') else [])


# ---------------------------------------------------------------------- other projects


def test_configs_ship_inside_the_package():
    """mmengine looks for `pkg::` configs in <pkg>/.mim/configs (a link to configs/ in the
    repository; setup.py's package_data copies it into wheels) and its model-index.yml."""
    shipped = pathlib.Path(mmattn.__file__).parent / '.mim'
    assert (shipped / 'configs' / 'retinanet_r50_sge.py').read_text() == (
        CONFIGS / 'retinanet_r50_sge.py').read_text()
    assert Config.fromfile(str(shipped / 'model-index.yml'))['Import'] == ['configs/metafile.yml']
    assert (shipped / 'configs' / 'metafile.yml').is_file()


def test_another_project_inherits_an_mmattn_config(tmp_path):
    child = tmp_path / 'my_retinanet.py'
    child.write_text("_base_ = 'mmattn::retinanet_r50_sge.py'\n"
                     'model = dict(bbox_head=dict(num_classes=3))\n')
    cfg = Config.fromfile(str(child))
    assert cfg.model.backbone.plugins == [PLUGINS['sge']]
    assert cfg.model.bbox_head.num_classes == 3
    assert cfg.train_cfg.max_epochs == 24
