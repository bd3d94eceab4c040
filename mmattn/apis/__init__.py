"""What the command-line tools call: load a config, train, test, run the demo."""
from .config import load_config
from .test import test
from .train import build_train_runner, train

__all__ = ['build_train_runner', 'load_config', 'test', 'train']
