"""Train a detector or classifier from a config: mmdet's tools/train.py arguments."""
import argparse

import mmattn  # noqa: F401  (registers the blocks, makes checkpoints load safely)
from mmattn.apis import add_launch_arguments, exit_on_known_error, parse_launch_arguments, train


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr to the real batch size')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from this checkpoint, or (no value) the latest in work-dir')
    add_launch_arguments(parser, 'data_root=/data/coco/ train_cfg.max_epochs=12')
    return parse_launch_arguments(parser)


def main() -> None:
    args = parse_args()
    with exit_on_known_error():
        train(args.config, cfg_options=args.cfg_options, work_dir=args.work_dir, amp=args.amp,
              auto_scale_lr=args.auto_scale_lr, resume=args.resume, launcher=args.launcher)


if __name__ == '__main__':
    main()
