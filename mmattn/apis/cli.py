"""The command-line arguments the train and test tools share, under mmdet's names."""
import argparse
import os

from mmengine.config import DictAction


def add_launch_arguments(parser: argparse.ArgumentParser, cfg_example: str) -> None:
    """``--cfg-options`` (``cfg_example`` shows a use), ``--launcher`` and ``--local-rank``."""
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help=f'override config keys, e.g. {cfg_example}')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_launch_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line; a rank given as an argument (torch.distributed.launch) reaches
    the environment, where MMEngine reads it, unless the launcher set ``LOCAL_RANK`` there."""
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args
