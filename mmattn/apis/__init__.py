"""What the command-line tools call: load a config, train, test, run the demo."""
from .cli import add_launch_arguments, parse_launch_arguments
from .config import exit_on_known_error, load_config
from .test import test
from .train import build_train_runner, train

__all__ = [
    'add_launch_arguments', 'build_train_runner', 'exit_on_known_error', 'load_config',
    'parse_launch_arguments', 'test', 'train'
]
