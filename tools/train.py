"""Train a detector or classifier from a config: mmdet's tools/train.py arguments."""
import argparse
import os

from mmengine.config import DictAction

import mmattn  # noqa: F401  (registers the blocks, makes checkpoints load safely)
from mmattn.apis import exit_on_known_error, train


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr to the real batch size')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from this checkpoint, or (no value) the latest in work-dir')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config keys, e.g. data_root=/data/coco/ '
                             'train_cfg.max_epochs=12')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main() -> None:
    args = parse_args()
    with exit_on_known_error():
        train(args.config, cfg_options=args.cfg_options, work_dir=args.work_dir, amp=args.amp,
              auto_scale_lr=args.auto_scale_lr, resume=args.resume, launcher=args.launcher)


if __name__ == '__main__':
    main()
