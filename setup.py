"""mmattn: attention blocks for ResNet backbones in OpenMMLab detection and classification."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def version() -> str:
    scope: dict = {}
    exec((ROOT / 'mmattn' / 'version.py').read_text(), scope)
    return scope['__version__']


setup(
    name='mmattn',
    version=version(),
    description='Attention blocks (SE, SGE, CGD, GSoP, CBAM, BAM, ECA, GC) as MMEngine plugins '
                'for ResNet backbones in MMDetection and MMPretrain',
    long_description=(ROOT / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmattn', 'mmattn.*']),
    # The configs ship inside the package (mmattn/.mim/configs links to ../../configs, as in
    # mmdet's layout) so that other projects inherit them: _base_ = 'mmattn::retinanet_r50_sge.py'.
    package_data={'mmattn': ['.mim/model-index.yml', '.mim/configs/**/*.py',
                             '.mim/configs/**/*.yml', 'kernels/*.cpp', 'kernels/*.h']},
    python_requires='>=3.10',
    # `==2.13.0` also accepts local builds such as 2.13.0+cu128, so a user's own CUDA torch is kept.
    # mmcv is not listed: pip would build it in an isolated environment without its compiled ops;
    # README's install order (and `make setup`) builds it first.
    install_requires=[
        'torch==2.13.0',
        'torchvision==0.28.0',
        'mmengine==0.10.7',
        'mmdet==3.3.0',
        'mmpretrain==1.2.0',
        'pycocotools',
        'numpy',
        'opencv-python',
        'ninja',  # builds mmattn/kernels on first use
    ],
    extras_require={'tests': ['pytest', 'ruff', 'matplotlib']},
    license='Apache-2.0',
)
