"""What the command-line tools call: load a config, train, test, run the demo."""
from .config import exit_on_known_error, load_config
from .test import test
from .train import build_train_runner, train

__all__ = ['build_train_runner', 'exit_on_known_error', 'load_config', 'test', 'train']
